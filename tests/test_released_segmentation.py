"""The released DINOv2 segmentation heads (`dinokit predict segmentation head=dinov2_vits14_ade20k_ms_head`):
head files in the official format (random tensors under the official keys for a tiny backbone), checked
against a transcription of mmseg's computation written out here, and the command end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_scales_and_norms
from PIL import Image

import dinokit
from dinokit import create_model, export_model
from dinokit.cli import main
from dinokit.errors import DinokitError
from dinokit.eval.released_segmentation import (
    InferenceSettings,
    iter_views,
    load_released_segmentation_head,
    mean_probabilities,
    rescale_size,
    segment_image,
    slide_logits,
    slide_windows,
    view_scales,
)
from dinokit.eval.segmentation import predict_segmentation
from dinokit.eval.segmentation_classes import ADE20K_CLASSES, VOC2012_CLASSES

DIM, DEPTH, PATCH = 96, 4, 4  # vit_micro_p4


def official_head_file(path: Path, width: int, classes: int, seed: int = 0, meta: dict | None = None) -> dict:
    """An mmcv checkpoint as released: state_dict with decode_head.bn.* and decode_head.conv_seg.*
    (random, BN running statistics included), and a meta dict if given. Returns the tensors."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "decode_head.bn.weight": 1 + 0.3 * torch.randn(width, generator=g),
        "decode_head.bn.bias": 0.3 * torch.randn(width, generator=g),
        "decode_head.bn.running_mean": 0.5 * torch.randn(width, generator=g),
        "decode_head.bn.running_var": 0.5 + torch.rand(width, generator=g),
        "decode_head.bn.num_batches_tracked": torch.tensor(1000),
        "decode_head.conv_seg.weight": 0.1 * torch.randn(classes, width, 1, 1, generator=g),
        "decode_head.conv_seg.bias": torch.randn(classes, generator=g),
    }
    torch.save({"state_dict": state} | ({"meta": meta} if meta is not None else {}), path)
    return state


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A tiny backbone with non-trivial norms, exported: (module, file)."""
    torch.manual_seed(0)
    net = perturb_scales_and_norms(create_model("vit_micro_p4")).eval()
    folder = tmp_path_factory.mktemp("released_seg")
    return net, export_model(net, folder / "micro.safetensors")


# ------------------------------------------------------------------------ the official computation, written out
def reference_probabilities(net, state, blocks, rgb, scales, flip, img_scale, crop, stride) -> torch.Tensor:
    """(C, H, W) mean softmax of mmseg 0.x's aug_test with the DINOv2 notebook's segmenter: per ratio and
    flip, mmcv imrescale to img_scale x r ((2048, 512) in the linear configs, (99999999, 640) in the ms
    ones), Normalize, slide_inference (encode_decode: CenterPadding ->
    get_intermediate_layers(out_indices, reshape=True) -> BNHead on in_index -> resize to the crop), resize
    to the original size, softmax, flip back; averaged."""
    height, width = rgb.shape[:2]
    img = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    mean = torch.tensor([123.675, 116.28, 103.53])[None, :, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[None, :, None, None]
    out_indices = [DEPTH - 4, DEPTH - 3, DEPTH - 2, DEPTH - 1]
    in_index = [3] if blocks == 1 else [0, 1, 2, 3]
    w_conv, b_conv = state["decode_head.conv_seg.weight"], state["decode_head.conv_seg.bias"]
    outputs = []
    for ratio in scales:
        long_side, short_side = int(img_scale[0] * ratio), int(img_scale[1] * ratio)
        factor = min(long_side / max(height, width), short_side / min(height, width))
        h, w = int(height * factor + 0.5), int(width * factor + 0.5)
        resized = img
        if (h, w) != (height, width):
            resized = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255)
        for flipped in (False, True) if flip else (False,):
            x = ((resized.flip(3) if flipped else resized) - mean) / std
            h_grids = max(h - crop + stride - 1, 0) // stride + 1
            w_grids = max(w - crop + stride - 1, 0) // stride + 1
            preds = torch.zeros(1, len(b_conv), h, w)
            count = torch.zeros(1, 1, h, w)
            for h_idx in range(h_grids):
                for w_idx in range(w_grids):
                    y1, x1 = h_idx * stride, w_idx * stride
                    y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
                    y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                    crop_img = x[:, :, y1:y2, x1:x2]
                    pads = []
                    for size in (crop_img.shape[3], crop_img.shape[2]):  # CenterPadding: last dim first
                        extra = math.ceil(size / PATCH) * PATCH - size
                        pads += [extra // 2, extra - extra // 2]
                    feats = net.get_intermediate_layers(F.pad(crop_img, pads), n=out_indices, reshape=True)
                    cat = torch.cat([feats[i] for i in in_index], dim=1)
                    bn = F.batch_norm(
                        cat,
                        state["decode_head.bn.running_mean"],
                        state["decode_head.bn.running_var"],
                        state["decode_head.bn.weight"],
                        state["decode_head.bn.bias"],
                        training=False,
                        eps=1e-5,
                    )
                    logit = F.conv2d(bn, w_conv, b_conv)
                    logit = F.interpolate(logit, size=crop_img.shape[2:], mode="bilinear", align_corners=False)
                    preds += F.pad(logit, (x1, w - x2, y1, h - y2))
                    count[:, :, y1:y2, x1:x2] += 1
            seg = F.interpolate(preds / count, size=(height, width), mode="bilinear", align_corners=False)
            prob = seg.softmax(dim=1)
            outputs.append(prob.flip(3) if flipped else prob)
    return (sum(outputs) / len(outputs))[0]


@pytest.mark.parametrize("kind", ["linear", "ms"])
def test_parity_with_the_official_slide_multiscale_flip_computation(micro, tmp_path, kind):
    """fp32, crop 30 / stride 19 (windows overlapping, padded 30 -> 32), on images of 40 x 70 (kept at
    ratio 1.0, enlarged at 1.32), 22 x 50 (shorter than a crop, enlarged at every ratio), 60 x 100
    (reduced: its logits enlarged back to its size) and 10 x 60 (6 times as wide as high: the linear
    configs' long side 4 S binds, the ms configs' 99999999 does not)."""
    net, weights = micro
    blocks, scales, flip = (1, (1.0,), False) if kind == "linear" else (4, (1.0, 1.32), True)
    img_scale, long_side = ((160, 40), None) if kind == "linear" else ((99999999, 40), 99999999)
    state = official_head_file(tmp_path / "head.pth", blocks * DIM, 7)
    released = load_released_segmentation_head(str(tmp_path / "head.pth"), weights, "cpu")
    assert (released.kind, released.blocks, released.classes) == (kind, blocks, None)
    if kind == "linear":  # the linear configs' img_scale (2048, 512), slide crop 512 / stride 341, no flip
        assert released.settings() == InferenceSettings((1.0,), False, 512, long_side=None, crop=512, stride=341)
    settings = InferenceSettings(
        scales, flip, image_size=40, long_side=long_side, crop=30, stride=19, batch_size=5, precision="fp32"
    )
    rng = np.random.default_rng(0)
    for height, width in ((40, 70), (22, 50), (60, 100), (10, 60)):
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = torch.from_numpy(rgb).permute(2, 0, 1)
        with torch.no_grad():
            views = list(iter_views(released, image, settings))
            expected = reference_probabilities(net, state, blocks, rgb, scales, flip, img_scale, 30, 19)
            # bands of 2 rows, views kept; or each view's probabilities summed at the image's size
            kept = segment_image(released, image, settings, keep_views=True, band_bytes=4 * 7 * width * 2)
            summed = segment_image(released, image, settings, keep_views=False, band_bytes=4 * 7 * width * 2)
        assert [tuple(v.shape[1:]) for v in views] == settings.view_sizes(height, width)
        if flip:  # the mirror image's windows written flipped into place: its whole map flipped back, exactly
            mirror = torch.randn(3, height + 5, width + 9)
            with torch.no_grad():
                flipped_back = slide_logits(released, mirror, settings).flip(-1)
                assert torch.equal(slide_logits(released, mirror, settings, mirrored=True), flipped_back)
        got = mean_probabilities(views, (height, width))
        assert got.shape == (7, height, width)
        assert (got - expected).abs().max() < 1e-5
        assert torch.equal(kept, got.argmax(0)) and torch.equal(summed, kept)
        assert (kept == expected.argmax(0)).float().mean() > 0.999


def test_windows_and_scales_by_hand():
    # 40 x 70, crop 28, stride 19: rows [0, 28), [12, 40); columns [0, 28), [19, 47), [38, 66), [42, 70)
    windows = slide_windows(40, 70, 28, 19)
    rows, cols = [(0, 28), (12, 40)], [(0, 28), (19, 47), (38, 66), (42, 70)]
    assert windows == [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols]
    count = np.zeros((40, 70), dtype=int)
    for y1, y2, x1, x2 in windows:
        count[y1:y2, x1:x2] += 1
    col_count = np.array([1] * 19 + [2] * 9 + [1] * 10 + [2] * 4 + [3] * 5 + [2] * 19 + [1] * 4)
    row_count = np.array([1] * 12 + [2] * 16 + [1] * 12)
    assert np.array_equal(count, row_count[:, None] * col_count[None, :])
    # an image within one crop: one window, the whole image; the mmseg test scale and ratios
    assert slide_windows(20, 512, 512, 341) == [(0, 20, 0, 512)]
    assert len(slide_windows(512, 683, 512, 341)) == 2 and len(slide_windows(885, 1180, 512, 341)) == 3 * 3
    assert view_scales(512, (1.0, 1.32, 1.73)) == [(2048, 512), (2703, 675), (3543, 885)]
    # the ms configs' img_scale (99999999, 640): only the short side binds, whatever the aspect ratio
    assert view_scales(640, (1.0, 1.32), 99999999) == [(99999999, 640), (131999998, 844)]
    assert rescale_size(100, 1000, (99999999, 640)) == (640, 6400)
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)  # factor 512 / 375: 682.67 + 0.5 -> 683
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # the long side binds: factor 2.048
    assert rescale_size(500, 375, (2703, 675)) == (900, 675)


def test_released_names_and_urls():
    from dinokit.models import hub

    name = hub.released_head("dinov2_vitb14_voc2012_ms_head")
    assert name == hub.HeadName("dinov2_vitb14", "segmentation", "voc2012", "ms")
    assert hub.released_head_url("dinov2_vitb14_voc2012_ms_head") == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_voc2012_ms_head.pth"
    )
    assert hub.released_head("/downloads/dinov2_vitg14_ade20k_linear_head.pth").backbone == "dinov2_vitg14"
    assert hub.released_head_url("/downloads/dinov2_vitg14_ade20k_linear_head.pth") is None  # a file: never downloaded
    assert hub.released_head("dinov2_vits14_reg_ade20k_linear_head").backbone is None  # no such released head
    assert hub.released_head_url("dinov2_vits14_reg_ade20k_linear_head") is None
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[:3] == ("wall", "building", "sky")
    assert ADE20K_CLASSES[7] == "bed" and ADE20K_CLASSES[-1] == "flag"
    assert len(VOC2012_CLASSES) == 21 and VOC2012_CLASSES[0] == "background" and VOC2012_CLASSES[-1] == "tvmonitor"


def test_cli_masks_at_the_images_sizes_with_the_class_names(micro, tmp_path, capsys):
    _, weights = micro
    names = [f"thing{i}" for i in range(5)]
    official_head_file(tmp_path / "my_head.pth", 4 * DIM, 5, meta={"CLASSES": tuple(names), "PALETTE": [[0, 0, 0]] * 5})
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    sizes = {"a": (30, 45), "sub/b": (41, 23)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{name}.png")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    args = ["predict", "segmentation", f"head={tmp_path / 'my_head.pth'}", f"model={weights}", f"images={images}"]
    keys = ["image_size=16", "scales=[1.0,1.5]", "precision=fp32", f"out={out}"]
    assert main([*args, *keys]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "segmentation: " in captured.err and "image" in captured.err  # a progress bar (an image can take a minute)
    assert "skipped 1 unreadable image" in printed and "wrote 2 masks" in printed
    for name, size in sizes.items():
        mask = np.asarray(Image.open(out / f"{name}.png"))
        assert mask.shape == size and mask.dtype == np.uint8 and mask.max() < 5
        assert Image.open(out / f"{name}_overlay.png").size == (2 * size[1] + 4, size[0])
    # from Python: the same masks
    released = dinokit.load_released_segmentation_head(str(tmp_path / "my_head.pth"), weights, "cpu")
    mask = released.predict(images / "sub" / "b.png", scales=[1.0, 1.5], image_size=16, precision="fp32")
    assert np.array_equal(mask, np.asarray(Image.open(out / "sub" / "b.png"))) and released.classes == names
    # the defaults of an ms head (this one is 4 blocks wide), as the released ms configs (a copy of
    # dinov2_vits14_voc2012_ms_config.py): img_scale (99999999, 640), slide crop 640 / stride 320, flips; the
    # notebook's first 3 of the configs' 5 img_ratios
    ms = InferenceSettings((1.0, 1.32, 1.73), True, 640, long_side=99999999, crop=640, stride=320)
    assert (released.kind, released.settings()) == ("ms", ms)
    # scoring (eval segmentation head=): the configs' 5 ratios, those of the published "+ms" numbers
    scored = InferenceSettings((1.0, 1.32, 1.73, 2.28, 3.0), True, 640, long_side=99999999, crop=640, stride=320)
    assert released.settings(scoring=True) == scored
    assert released.settings(scales=[1.0], scoring=True).scales == (1.0,)
    with pytest.raises(DinokitError, match="scales must be a list of positive ratios"):
        released.predict(images / "a.png", scales=[])
    with pytest.raises(DinokitError, match="precision must be one of bf16, fp32"):
        released.predict(images / "a.png", precision="fp16")
    record = json.loads((out / "classes.json").read_text())
    assert record["classes"] == names and record["kind"] == "ms" and record["flip"] is True
    assert record["scales"] == [1.0, 1.5] and record["image_size"] == 16
    # a rerun into out over one image leaves its files alone (classes.json is this run's too)
    assert main([*args[:4], f"images={images / 'a.png'}", *keys]) == 0
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name[0] != ".")
    assert left == ["a.png", "a_overlay.png", "classes.json"]
    assert "classes.json" in json.loads((out / ".dinokit-predictions.json").read_text())["files"]
    # bf16 autocast (the default): the backbone's features rounded, the masks nearly the same
    assert main([*args, *keys[:2], f"out={tmp_path / 'bf16'}"]) == 0
    assert main([*args, *keys[:3], f"out={tmp_path / 'fp32'}"]) == 0
    for name in sizes:
        fp32, bf16 = (np.asarray(Image.open(tmp_path / kind / f"{name}.png")) for kind in ("fp32", "bf16"))
        assert (fp32 == bf16).mean() > 0.9

    # a dinokit head file takes no released-head keys
    with pytest.raises(DinokitError, match="apply to the released DINOv2 heads only"):
        predict_segmentation(str(tmp_path / "x.safetensors"), str(images), str(tmp_path / "o2"), scales=[1.0])


class NotPlain:  # pickled by torch.save; weights_only refuses it
    pass


def test_what_a_wrong_head_or_backbone_is_told(micro, tmp_path, monkeypatch):
    _, weights = micro
    official_head_file(tmp_path / "dinov2_vits14_ade20k_linear_head.pth", DIM, 150)
    with pytest.raises(DinokitError, match=r"released for dinov2_vits14 .* pass model=dinov2_vits14"):
        load_released_segmentation_head(str(tmp_path / "dinov2_vits14_ade20k_linear_head.pth"), weights, "cpu")
    official_head_file(tmp_path / "wide.pth", 2 * DIM, 3)
    with pytest.raises(DinokitError, match=r"takes 192 feature channels.*gives 96 \(linear\) or 384 \(ms\)"):
        load_released_segmentation_head(str(tmp_path / "wide.pth"), weights, "cpu")
    with pytest.raises(DinokitError, match="pass the backbone it was trained on as model="):
        load_released_segmentation_head(str(tmp_path / "wide.pth"), None, "cpu")
    torch.save({"weight": torch.zeros(1000, 2 * DIM), "bias": torch.zeros(1000)}, tmp_path / "cls.pth")
    with pytest.raises(DinokitError, match=r"not a DINOv2 segmentation head.*use `dinokit predict classification`"):
        load_released_segmentation_head(str(tmp_path / "cls.pth"), weights, "cpu")
    depth = {
        "decode_head.conv_depth.weight": torch.zeros(256, 2 * DIM, 1, 1),
        "decode_head.conv_depth.bias": torch.zeros(256),
    }
    torch.save({"state_dict": depth}, tmp_path / "depth.pth")
    with pytest.raises(DinokitError, match=r"not a DINOv2 segmentation head.*use `dinokit predict depth`"):
        load_released_segmentation_head(str(tmp_path / "depth.pth"), weights, "cpu")
    with pytest.raises(
        DinokitError, match=r"released DINOv2 depth head, not a segmentation head: use `dinokit predict depth"
    ):
        load_released_segmentation_head("dinov2_vits14_nyu_dpt_head", weights, "cpu")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(DinokitError, match=r"not a DINOv2 segmentation head.*this file a Tensor"):
        load_released_segmentation_head(str(tmp_path / "tensor.pth"), weights, "cpu")
    state = official_head_file(tmp_path / "plain.pth", DIM, 3)
    torch.save({"state_dict": state, "meta": {"env": NotPlain()}}, tmp_path / "pickle.pth")
    with pytest.raises(DinokitError, match="which dinokit does not unpickle"):
        load_released_segmentation_head(str(tmp_path / "pickle.pth"), weights, "cpu")
    bad = dict(state, **{"decode_head.conv_seg.bias": torch.zeros(4)})
    torch.save({"state_dict": bad}, tmp_path / "shapes.pth")
    with pytest.raises(DinokitError, match="do not fit a BatchNorm"):
        load_released_segmentation_head(str(tmp_path / "shapes.pth"), weights, "cpu")

    def offline(url, dst, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    with pytest.raises(DinokitError, match=r"offline.*head=/path/to/dinov2_vits14_voc2012_ms_head.pth"):
        load_released_segmentation_head("dinov2_vits14_voc2012_ms_head", weights, "cpu")


def test_a_released_name_is_downloaded_once_with_its_dataset_classes(tmp_path, monkeypatch):
    """By name: the head fetched from its URL into the cache once; VOC2012's names where the file has
    no meta; the released backbone's shape accepted (a random ViT-S/14 stands for its weights)."""
    torch.manual_seed(0)
    vits = export_model(create_model("dinov2_vits14"), tmp_path / "vits14.safetensors")
    official_head_file(tmp_path / "served.pth", 384, 21)
    fetched = []

    def download(url, dst, progress=True):
        fetched.append(url)
        Path(dst).write_bytes((tmp_path / "served.pth").read_bytes())

    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("torch.hub.download_url_to_file", download)
    for _ in range(2):
        released = load_released_segmentation_head("dinov2_vits14_voc2012_linear_head", vits, "cpu")
    assert fetched == ["https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_voc2012_linear_head.pth"]
    assert released.path == tmp_path / "cache" / "dinov2_vits14_voc2012_linear_head.pth"
    assert released.classes == list(VOC2012_CLASSES) and (released.kind, released.blocks) == ("linear", 1)


@pytest.mark.parametrize(
    ("command", "head", "its_command"),
    [
        ("classification", "dinov2_vits14_ade20k_linear_head", "segmentation"),
        ("segmentation", "dinov2_vitb14_reg_linear4_head.pth", "classification"),
        ("depth", "dinov2_vits14_voc2012_ms_head", "segmentation"),
    ],
)
def test_a_released_head_of_another_task_is_told_its_command(tmp_path, capsys, command, head, its_command):
    """predict classification took any released name or .pth for a classification head, and asked for
    model= (a segmentation .pth) or failed on its tensors; each predict command now names the right one."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (28, 28)).save(tmp_path / "images" / "a.png")
    out = tmp_path / ("out.json" if command == "classification" else "out")
    args = ["predict", command, f"head={head}", f"images={tmp_path / 'images'}", f"out={out}"]
    assert main(args) != 0
    assert f"not a {command} head: use `dinokit predict {its_command} head={head}`" in capsys.readouterr().err


def test_a_segmentation_pth_named_like_a_classifier_is_not_refused(micro, tmp_path):
    """voc_linear_head.pth (no released backbone, no dataset in its name) is a segmentation head given model=;
    predict segmentation refused it as 'a released DINOv2 classification head'."""
    _, weights = micro
    official_head_file(tmp_path / "voc_linear_head.pth", DIM, 21)
    released = load_released_segmentation_head(str(tmp_path / "voc_linear_head.pth"), weights, "cpu")
    assert (released.kind, released.blocks, len(released.head.conv.bias)) == ("linear", 1, 21)


@pytest.mark.parametrize(
    ("command", "head", "released"),
    [
        ("segmentation", "dinov2_vits14_reg_ade20k_ms_head", "dinov2_vit{s,b,l,g}14_{ade20k,voc2012}_{linear,ms}_head"),
        ("depth", "dinov2_vitl16_nyu_dpt_head", "dinov2_vit{s,b,l,g}14_{nyu,kitti}_{linear,linear4,dpt}_head"),
    ],
)
def test_a_name_no_head_was_released_under_is_told_so(tmp_path, capsys, command, head, released):
    """A bare name that no released head has (registers, a typo) was told it 'is a .pth head' needing model=,
    and with model= 'head file not found ... has no extension'; it is told the released names."""
    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    for model in ([], ["model=random:vit_micro_p4"]):
        args = [f"head={head}", *model, f"images={tmp_path / 'a.png'}", f"out={tmp_path / 'o'}"]
        assert main(["predict", command, *args]) == 2
        err = capsys.readouterr().err
        assert f"no released DINOv2 {command} head is named {head}, and no such file exists" in err
        assert released in err
