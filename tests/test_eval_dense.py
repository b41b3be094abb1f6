"""Dense probes on rendered scenes with exact masks and depth (dinokit.data.synthetic).

"Strong enough" backbone: no pretrained weights can be downloaded here, so the tests use a small ViT
trained with supervision on other rendered scenes (tests/fixtures/make_dense_backbone.py), i.e. a
backbone whose patch tokens are known to carry the masks and depths. The probes, trained from
scratch on its frozen features, must recover that signal and beat the trivial baselines by a wide
margin; the same architecture at random initialisation must not (so the margin comes from the
features, and the test can fail). Honestly: this 0.5M-parameter backbone carries foreground vs
background and depth strongly, but which of the 8 shapes a pixel belongs to only weakly (a linear
probe on it reaches about 20% mIoU against 9% for "all background"; per-shape IoUs 3-30%).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.cli import main
from dinokit.data.synthetic import write_dense_set
from dinokit.errors import DinokitError
from dinokit.eval.dense import read_depth, read_mask, read_pairs
from dinokit.eval.heads import load_head_file

FIXTURE = Path(__file__).parent / "fixtures" / "dense_backbone.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: up to 5x faster on a busy machine


COMMON = ["image_size=64", "num_workers=0", "batch_size=64", "train_batch_size=16"]


def scene_folders(factory, name: str, train: int, val: int, size: int):
    """root/train and root/val of rendered dense scenes (masks and depth)."""
    root = factory.mktemp(name)
    write_dense_set(root / "train", train, size=size, seed=0)
    write_dense_set(root / "val", val, size=size, seed=1)
    return root


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return scene_folders(tmp_path_factory, "scenes", 64, 24, size=64)


@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory):
    """The fixture's architecture at random initialisation (the control)."""
    torch.manual_seed(0)
    config = dinokit.load_model(FIXTURE).config
    path = tmp_path_factory.mktemp("random") / "random.safetensors"
    return dinokit.export_model(dinokit.VisionTransformer(config), path)


def run(command: str, model, scenes, out: Path, *extra: str) -> dict:
    args = [f"model={model}", f"train={scenes / 'train'}", f"val={scenes / 'val'}", f"out={out}", *COMMON, *extra]
    assert main(["eval", command, *args, f"cache={out.parent / 'cache'}"]) == 0
    return json.loads((out / f"{command}.json").read_text())


def test_segmentation_probe_beats_trivial_baselines_on_a_backbone_that_carries_the_signal(
    scenes, random_backbone, tmp_path
):
    r = run("segmentation", FIXTURE, scenes, tmp_path / "seg", "epochs=25", "lr=3e-3")
    majority = r["baselines"]["majority_class"]
    best_baseline = max(b["miou"] for b in r["baselines"].values())
    assert majority["miou"] < 10.0  # all background: background IoU / 9 classes
    assert r["miou"] >= 1.6 * best_baseline
    # where the signal is strongest, foreground vs background: background IoU well above "all background"
    assert r["iou_per_class"][0] >= majority["iou"][0] + 5
    assert len(r["iou_per_class"]) == 9 and r["protocol"]["blocks"] == [3]
    control = run("segmentation", random_backbone, scenes, tmp_path / "control", "epochs=25", "lr=3e-3")
    assert control["miou"] < 1.2 * best_baseline < r["miou"]
    assert control["iou_per_class"][0] < majority["iou"][0] + 2
    for png in r["examples"]:
        assert Image.open(png).size == (3 * 64 + 2 * 4, 64)  # image | truth | prediction

    # the saved head applied to new images by `dinokit predict segmentation`
    out = tmp_path / "predicted"
    head = tmp_path / "seg" / "segmentation_head.safetensors"
    assert main(["predict", "segmentation", f"head={head}", f"images={scenes / 'val' / 'images'}", f"out={out}"]) == 0
    truth = [read_mask(p) for p in sorted((scenes / "val" / "masks").iterdir())]
    predicted = [read_mask(out / p.name) for p in sorted((scenes / "val" / "masks").iterdir())]
    assert predicted[0].shape == truth[0].shape and (out / "00000_overlay.png").exists()
    # the same head on features recomputed from the files reproduces the evaluation
    accuracy = 100 * np.mean(np.concatenate([(p == t).ravel() for p, t in zip(predicted, truth, strict=True)]))
    assert abs(accuracy - r["pixel_accuracy"]) < 1.0


def test_depth_probe_beats_trivial_baselines_on_a_backbone_that_carries_the_signal(scenes, random_backbone, tmp_path):
    r = run("depth", FIXTURE, scenes, tmp_path / "depth", "epochs=8", "max_depth=15")
    per_pixel = r["baselines"]["per_pixel_mean"]  # the stronger baseline: the background depth is set by the row
    assert r["rmse"] <= 0.7 * per_pixel["rmse"] and r["abs_rel"] <= 0.5 * per_pixel["abs_rel"]
    assert r["delta1"] >= per_pixel["delta1"] + 15
    assert r["protocol"]["bins"] == "linspace(0.001, 15.0, 256)" and r["protocol"]["blocks"] == [0, 1, 2, 3]
    control = run("depth", random_backbone, scenes, tmp_path / "control", "epochs=8", "max_depth=15")
    assert control["rmse"] > 0.9 * per_pixel["rmse"]

    out = tmp_path / "predicted"
    head = tmp_path / "depth" / "depth_head.safetensors"
    assert (
        main(["predict", "depth", f"head={head}", f"images={scenes / 'val' / 'images' / '00001.png'}", f"out={out}"])
        == 0
    )
    predicted = read_depth(out / "00001.png", 1000.0)
    truth = read_depth(scenes / "val" / "depth" / "00001.png", 1000.0)
    assert predicted.shape == truth.shape and predicted.min() >= 0.001 and predicted.max() <= 15.0
    assert np.sqrt(np.mean((predicted - truth) ** 2)) < per_pixel["rmse"]


def test_dense_data_errors_and_formats(tmp_path, capsys):
    train = write_dense_set(tmp_path / "train", 3, size=16, seed=0)
    val = write_dense_set(tmp_path / "val", 1, size=16, seed=1)
    Image.fromarray(np.full((16, 16), 12, dtype=np.uint8)).save(val / "masks" / "00000.png")
    args = [f"train={train}", f"val={val}", "model=random:vit_nano_p2", "image_size=16", "epochs=1", "cache=none"]
    assert main(["eval", "segmentation", *args, f"out={tmp_path / 'o'}", "num_workers=0", "num_classes=9"]) == 2
    assert "holds class 12 but num_classes=9" in capsys.readouterr().err
    root = write_dense_set(tmp_path / "set", 2, size=16, seed=0)
    (root / "masks" / "00001.png").unlink()
    with pytest.raises(DinokitError, match=r"1 image\(s\) .* have no masks file .* 00001.png needs masks/00001.png"):
        read_pairs(root, "masks", (".png",))
    with pytest.raises(DinokitError, match="must hold images/ and depth/"):
        read_pairs(tmp_path, "depth", (".png", ".npy"))
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(DinokitError, match="one class index per pixel"):
        read_mask(tmp_path / "rgb.png")
    metres = np.array([[1.5, 0.0], [12.25, np.nan]], dtype=np.float32)
    np.save(tmp_path / "d.npy", metres)
    assert np.array_equal(read_depth(tmp_path / "d.npy", 1000.0), np.nan_to_num(metres))
    Image.fromarray(np.array([[1500, 0], [12250, 7]], dtype=np.uint16)).save(tmp_path / "d.png")
    assert np.allclose(read_depth(tmp_path / "d.png", 1000.0), [[1.5, 0.0], [12.25, 0.007]])


def test_predict_writes_full_size_outputs_and_checks_the_backbone(tmp_path, capsys):
    from dinokit.eval.common import prepare_backbone
    from dinokit.eval.heads import head_metadata, save_head
    from dinokit.eval.segmentation import LinearSegmentationHead

    backbone = prepare_backbone("random:vit_nano_p2", "cpu", seed=0)
    head = LinearSegmentationHead(backbone.model.embed_dim, 3).eval()
    meta = head_metadata(backbone, 16, (1,), True, 0, task="segmentation", num_classes=3, ignore_index=255)
    save_head(tmp_path / "head.safetensors", head, meta)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "in" / "wide.png")  # W=30, H=20
    (tmp_path / "in" / "broken.jpg").write_bytes(b"nope")
    args = ["predict", "segmentation", f"head={tmp_path / 'head.safetensors'}", f"images={tmp_path / 'in'}"]
    assert main([*args, f"out={tmp_path / 'out'}", "num_workers=0"]) == 0
    mask = read_mask(tmp_path / "out" / "wide.png")
    assert mask.shape == (20, 30) and mask.max() < 3 and "skipped 1 unreadable" in capsys.readouterr().out
    assert main([*args, f"out={tmp_path / 'o2'}", "model=random:vit_nano_p2", "num_workers=0"]) == 0  # same seed
    assert main([*args[:1], "depth", *args[2:], f"out={tmp_path / 'o3'}"]) == 2
    assert "is a segmentation head, not a depth head" in capsys.readouterr().err
    other = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "other.safetensors")
    assert main([*args, f"out={tmp_path / 'o4'}", f"model={other}"]) == 2
    assert "Pass the backbone the head was trained with" in capsys.readouterr().err
    moved = tmp_path / "moved"  # a head whose backbone file is gone asks for model=
    moved.mkdir()
    dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "nano.safetensors")
    nano = prepare_backbone(str(tmp_path / "nano.safetensors"), "cpu")
    assert head_metadata(nano, 16, (1,), True, 0)["model"] == str((tmp_path / "nano.safetensors").resolve())
    save_head(
        moved / "head.safetensors", head, head_metadata(nano, 16, (1,), True, 0, task="segmentation", num_classes=3)
    )
    (tmp_path / "nano.safetensors").unlink()
    assert (
        main(
            [
                "predict",
                "segmentation",
                f"head={moved / 'head.safetensors'}",
                f"images={tmp_path / 'in'}",
                f"out={moved}",
            ]
        )
        == 2
    )
    assert "cannot be loaded" in (err := capsys.readouterr().err) and "pass it as model=" in err
    photo = (tmp_path / "in" / "wide.png").read_bytes()
    assert main([*args, f"out={tmp_path / 'in'}", "num_workers=0"]) == 2  # would write in/wide.png
    assert f"would overwrite the input {tmp_path / 'in' / 'wide.png'}" in capsys.readouterr().err
    assert (tmp_path / "in" / "wide.png").read_bytes() == photo
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"nope")  # nothing readable: was "wrote 0 masks", exit 0
    assert main([*args[:3], f"images={tmp_path / 'bad'}", f"out={tmp_path / 'o5'}", "num_workers=0"]) == 2
    assert "none of the 1 images of" in (err := capsys.readouterr().err) and "broken.jpg: not an image" in err
    assert not (tmp_path / "o5").exists()  # refused before any output: no empty folder left behind


@pytest.fixture(scope="module")
def small_scenes(tmp_path_factory):
    """A handful of 32 px scenes: enough for the probes to run end to end in a second or two."""
    return scene_folders(tmp_path_factory, "small", 6, 3, size=32)


SMALL = ["image_size=32", "epochs=1", "cache=none", "num_workers=0", "batch_size=8", "train_batch_size=4"]


def small_run(command: str, scenes: Path, out: Path, *extra: str) -> dict:
    args = [f"model={FIXTURE}", f"train={scenes / 'train'}", f"val={scenes / 'val'}", f"out={out}", *SMALL, *extra]
    assert main(["eval", command, *args]) == 0
    return json.loads((out / f"{command}.json").read_text())


def test_segmentation_on_the_last_4_blocks_concatenated(small_scenes, tmp_path, capsys):
    r = small_run("segmentation", small_scenes, tmp_path / "seg", "n_last_blocks=4")
    assert r["protocol"]["blocks"] == [0, 1, 2, 3] and 0.0 <= r["miou"] <= 100.0
    head = load_head_file(str(tmp_path / "seg" / "segmentation_head.safetensors"))[0]
    assert head["conv.weight"].shape[1] == 4 * 96  # the 4 blocks' tokens side by side
    out = capsys.readouterr().out
    assert "Resize" in r["protocol"]["transform"] and f"transform: {r['protocol']['transform']}" in out
    assert "mIoU" in out


def test_depth_on_one_block_writes_example_pngs(small_scenes, tmp_path, capsys):
    r = small_run("depth", small_scenes, tmp_path / "depth", "n_layers=1", "num_examples=2", "max_depth=15")
    assert r["protocol"]["blocks"] == [3] and np.isfinite([r["rmse"], r["abs_rel"], r["delta1"]]).all()
    assert f"transform: {r['protocol']['transform']}" in capsys.readouterr().out
    assert len(r["examples"]) == 2
    for png in r["examples"]:
        assert Path(png).parent == tmp_path / "depth" / "examples"
        with Image.open(png) as image:
            image.verify()  # a complete, valid file
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == (3 * 32 + 2 * 4, 32)  # image | truth | prediction


# ------------------------------------------------------------------- data edge cases (tiny, seconds)
TINY = ["model=random:vit_nano_p2", "image_size=16", "epochs=1", "cache=none", "num_workers=0", "precision=fp32"]


def tiny_run(command: str, train: Path, val: Path, out: Path, *extra: str) -> dict:
    assert main(["eval", command, f"train={train}", f"val={val}", f"out={out}", *TINY, *extra]) == 0
    return json.loads((out / f"{command}.json").read_text())


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        Image.fromarray(array).save(path)


def test_an_in_range_ignore_index_is_never_predicted_nor_averaged(tmp_path, capsys):
    from dinokit.eval.cache import Features
    from dinokit.eval.dense import DenseSplit
    from dinokit.eval.segmentation import LinearSegmentationHead, evaluate_segmentation

    # a head whose logits are its bias (zero weights, zero features): class 0 >> 1 > 2 everywhere
    head = LinearSegmentationHead(2, 3).eval()
    torch.nn.init.zeros_(head.conv.weight)
    head.conv.bias.data = torch.tensor([10.0, 1.0, 0.0])
    save(tmp_path / "truth.png", np.array([[0, 1], [1, 2]], dtype=np.uint8))  # 0 = unlabelled
    feats = Features({"layer_patch_tokens": [np.zeros((1, 1, 4, 2), np.float16)]}, np.arange(1), [])
    split = DenseSplit(feats, [tmp_path / "im.png"], [tmp_path / "truth.png"], None, [(2, 2)], (2, 2), "val")
    train_targets = torch.tensor([[[0, 0], [1, 2]]])
    scores, baselines = evaluate_segmentation(head, split, 3, 0, torch.device("cpu"), train_targets)
    # class 0 is masked, so 1 is predicted everywhere: truth 1,1,2 -> IoU1 = 2/3, IoU2 = 0, class 0 None
    assert scores["iou"][0] is None and scores["iou"][1] == pytest.approx(200 / 3) and scores["iou"][2] == 0.0
    assert scores["miou"] == pytest.approx(100 / 3) and scores["pixel_accuracy"] == pytest.approx(200 / 3)
    # per position, the most frequent training class other than 0: 1 1 / 1 2 -> every labelled pixel right
    assert baselines["per_pixel_majority"]["miou"] == pytest.approx(100.0)
    assert baselines["majority_class"]["class"] == 1

    # `predict segmentation` with the same head (ignore_index=0 in its metadata) writes 1, never 0
    from dinokit.eval.common import prepare_backbone
    from dinokit.eval.heads import head_metadata, save_head

    backbone = prepare_backbone("random:vit_nano_p2", "cpu", seed=0)
    head = LinearSegmentationHead(backbone.model.embed_dim, 3).eval()
    torch.nn.init.zeros_(head.conv.weight)
    head.conv.bias.data = torch.tensor([10.0, 1.0, 0.0])
    meta = head_metadata(backbone, 16, (1,), True, 0, task="segmentation", num_classes=3, ignore_index=0)
    save_head(tmp_path / "head.safetensors", head, meta)
    save(tmp_path / "in" / "a" / "x.png", np.full((12, 10, 3), 90, np.uint8))
    save(tmp_path / "in" / "b" / "x.png", np.full((12, 10, 3), 30, np.uint8))  # same stem, other folder
    args = [f"head={tmp_path / 'head.safetensors'}", f"images={tmp_path / 'in'}", f"out={tmp_path / 'out'}"]
    assert main(["predict", "segmentation", *args, "num_workers=0"]) == 0
    for sub in ("a", "b"):  # subfolders mirrored, nothing overwritten
        assert (read_mask(tmp_path / "out" / sub / "x.png") == 1).all()


def test_float_depth_images_are_metres_and_integer_images_are_scaled(tmp_path):
    metres = np.array([[1.5, 0.0], [12.25, np.nan]], dtype=np.float32)
    Image.fromarray(metres, mode="F").save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as im:
        assert im.mode == "F"
    assert np.array_equal(read_depth(tmp_path / "f.tif", 1000.0), [[1.5, 0.0], [12.25, 0.0]])  # not / 1000
    Image.fromarray(np.array([[1500, 0], [70000, 7]], dtype=np.int32)).save(tmp_path / "i.tif")  # 32-bit int
    assert np.allclose(read_depth(tmp_path / "i.tif", 1000.0), [[1.5, 0.0], [70.0, 0.007]])
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(DinokitError, match=r"shape \(2, 2, 3\); a depth map must be \(H, W\)"):
        read_depth(tmp_path / "rgb.png", 1000.0)


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_an_unreadable_target_drops_its_pair_and_is_counted(task, tmp_path, capsys):
    folder = "masks" if task == "segmentation" else "depth"
    train = write_dense_set(tmp_path / "train", 3, size=16, seed=0)
    val = write_dense_set(tmp_path / "val", 3, size=16, seed=1)
    (val / "images" / "00000.png").write_bytes(b"not a png")  # a bad image, counted as before
    for root in (train, val):
        data = (root / folder / "00001.png").read_bytes()
        (root / folder / "00001.png").write_bytes(data[: len(data) // 2])  # truncated
    extra = ["max_depth=10"] if task == "depth" else []
    r = tiny_run(task, train, val, tmp_path / "out", *extra)
    p = r["protocol"]  # val: one bad image and one bad target file, both counted
    assert (p["train_images"], p["train_bad_files"], p["val_images"], p["val_bad_files"]) == (2, 1, 1, 2)
    out = capsys.readouterr().out
    example = train / folder / "00001.png"
    assert f"skipped 1 {folder} file(s) unreadable or not fitting their image, e.g. {example}" in out
    for i in (0, 2):  # every target of the set unreadable: an error that names the set, not a traceback
        (train / folder / f"{i:05d}.png").write_bytes(b"")
    args = [f"train={train}", f"val={val}", f"out={tmp_path / 'o2'}", *TINY, *extra]
    assert main(["eval", task, *args]) == 2
    assert f"none of the 3 {folder} files of {train} could be read and fit its image" in capsys.readouterr().err


def test_images_in_subfolders_pair_with_the_same_subfolders_of_targets(tmp_path):
    for sub, value in (("a", 1), ("b", 2)):
        save(tmp_path / "images" / sub / "0.png", np.zeros((4, 4, 3), np.uint8))
        save(tmp_path / "masks" / sub / "0.png", np.full((4, 4), value, np.uint8))
    images, targets = read_pairs(tmp_path, "masks", (".png",))
    assert images == [tmp_path / "images" / "a" / "0.png", tmp_path / "images" / "b" / "0.png"]
    assert targets == [tmp_path / "masks" / "a" / "0.png", tmp_path / "masks" / "b" / "0.png"]
    assert [read_mask(t)[0, 0] for t in targets] == [1, 2]
    save(tmp_path / "masks" / "0.png", np.zeros((4, 4), np.uint8))  # a flat target does not serve both
    (tmp_path / "masks" / "b" / "0.png").unlink()
    with pytest.raises(DinokitError, match=r"1 image\(s\) .* b/0.png needs masks/b/0.png; subfolders"):
        read_pairs(tmp_path, "masks", (".png",))
    save(tmp_path / "masks" / "b" / "0.png", np.zeros((4, 4), np.uint8))
    save(tmp_path / "images" / "a" / "0.jpg", np.zeros((4, 4, 3), np.uint8))  # a/0.png and a/0.jpg: one key
    with pytest.raises(DinokitError, match=r"images/a/0.jpg and .*images/a/0.png would share .* masks/a/0"):
        read_pairs(tmp_path, "masks", (".png",))
    (tmp_path / "images" / "a" / "0.jpg").unlink()
    save(tmp_path / "masks" / "a" / "0.tif", np.zeros((4, 4), np.uint8))  # two targets for one image
    with pytest.raises(DinokitError, match=r"masks/a/0.png and .*masks/a/0.tif are both the masks file"):
        read_pairs(tmp_path, "masks", (".png", ".tif"))


def test_default_num_classes_and_max_depth_come_from_the_full_size_targets(tmp_path, capsys):
    # 32 px targets, trained at 16 px: nearest downsampling keeps even rows, so row 1 vanishes from it
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(2):
            save(tmp_path / split / "images" / f"{i}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            mask = np.zeros((32, 32), np.uint8)
            mask[16:] = 1
            mask[1] = 4  # a thin top class, only at full size
            mask[3, :4] = 255  # unlabelled: not a class
            save(tmp_path / split / "masks" / f"{i}.png", mask)
            depth = np.full((32, 32), 2000, np.uint16)
            depth[1, 5] = 7500  # the deepest pixel, only at full size
            save(tmp_path / split / "depth" / f"{i}.png", depth)
    train, val = tmp_path / "train", tmp_path / "val"
    r = tiny_run("segmentation", train, val, tmp_path / "seg")
    assert r["protocol"]["num_classes"] == 5 and len(r["iou_per_class"]) == 5  # classes 0..4
    r = tiny_run("depth", train, val, tmp_path / "depth")
    assert r["protocol"]["bins"] == "linspace(0.001, 7.5, 256)"
    assert "max_depth=7.500 (the largest training depth" in capsys.readouterr().out


def test_predict_depth_warns_about_depths_clipped_to_16_bits(tmp_path, capsys):
    from dinokit.eval.common import prepare_backbone
    from dinokit.eval.depth import LinearDepthHead
    from dinokit.eval.heads import head_metadata, save_head

    backbone = prepare_backbone("random:vit_nano_p2", "cpu", seed=0)
    head = LinearDepthHead(backbone.model.embed_dim, 1, 0.001, 80.0).eval()
    torch.nn.init.zeros_(head.conv.weight)
    head.conv.bias.data[-1] = 1000.0  # nearly all weight on the 80 m bin: depth ~ 78 m everywhere
    meta = head_metadata(
        backbone, 16, (1,), False, 0, task="depth", with_cls=True, min_depth=0.001, max_depth=80.0, depth_scale=1000.0
    )
    save_head(tmp_path / "head.safetensors", head, meta)
    save(tmp_path / "in" / "x.png", np.full((20, 30, 3), 90, np.uint8))
    args = ["predict", "depth", f"head={tmp_path / 'head.safetensors'}", f"images={tmp_path / 'in'}", "num_workers=0"]
    assert main([*args, f"out={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    # 78 m x 1000 > 65535: all 20 x 30 pixels clipped; 65535 / 80 = 819.19 -> depth_scale=819 fits the range
    assert "warning: 600 pixel(s) deeper than 65.535 m were clipped" in out and "pass depth_scale=819 " in out
    assert (np.asarray(Image.open(tmp_path / "out" / "x.png")) == 65535).all()
    assert main([*args, f"out={tmp_path / 'o2'}", "depth_scale=819"]) == 0
    assert "warning" not in capsys.readouterr().out
    units = np.asarray(Image.open(tmp_path / "o2" / "x.png")).astype(np.float64)
    assert 75 < units.min() / 819 <= units.max() / 819 < 80  # every pixel kept, in metres x 819


def test_targets_are_read_as_their_images_exif_orientation_and_any_damage_skips_the_pair(tmp_path):
    import io
    import struct

    from dinokit.data.images import open_rgb
    from dinokit.eval.dense import read_targets

    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo and its mask, both displayed rotated by 90 degrees clockwise
    Image.new("RGB", (6, 4)).save(tmp_path / "photo.jpg", exif=exif)
    stored = np.arange(24, dtype=np.uint8).reshape(4, 6)
    Image.fromarray(stored).save(tmp_path / "mask.png", exif=exif)
    Image.fromarray(stored.astype(np.uint16) * 100).save(tmp_path / "depth.png", exif=exif)
    assert open_rgb(tmp_path / "photo.jpg").size == (4, 6)  # as `segment` reads a reference mask
    assert np.array_equal(read_mask(tmp_path / "mask.png"), np.rot90(stored, -1))
    assert np.allclose(read_depth(tmp_path / "depth.png", 1000.0), np.rot90(stored, -1) / 10)
    tiff = io.BytesIO()
    Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(tiff, "TIFF")
    data = bytearray(tiff.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", data[ifd : ifd + 2])[0], 12):
        if struct.unpack("<H", data[entry : entry + 2])[0] == 273:  # StripOffsets, made a RATIONAL
            data[entry + 2 : entry + 4] = struct.pack("<H", 5)
    (tmp_path / "bad.tif").write_bytes(bytes(data))  # Pillow raises TypeError: was a traceback
    targets, bad = read_targets([tmp_path / "bad.tif"], lambda p: read_depth(p, 1000.0), 4, None)
    assert targets == [None] and [path for path, _ in bad] == [tmp_path / "bad.tif"]


def test_num_classes_below_the_train_masks_classes_and_zero_epochs_are_clear_errors(tmp_path, capsys):
    """num_classes=2 on masks holding class 2 crashed in cross_entropy (IndexError: Target 2 is out of
    bounds); epochs=0 reported the untrained head as the probe."""
    train = write_dense_set(tmp_path / "train", 2, size=16, seed=0)
    train_max = max(int(np.asarray(Image.open(p)).max()) for p in (train / "masks").glob("*.png"))
    args = [f"train={train}", f"val={train}", f"out={tmp_path / 'o'}", *TINY]
    assert main(["eval", "segmentation", *args, f"num_classes={train_max}"]) == 2
    assert f"holds class {train_max} but num_classes={train_max}" in capsys.readouterr().err
    for command in ("segmentation", "depth"):
        assert main(["eval", command, *args, "epochs=0"]) == 2
        assert "epochs must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_a_target_of_another_shape_than_its_image_drops_its_pair(task, tmp_path, capsys):
    """A mask or depth map of another aspect than its image (here transposed) was silently stretched
    onto it; a target at a lower resolution of the same aspect still pairs."""
    folder = "masks" if task == "segmentation" else "depth"
    train = write_dense_set(tmp_path / "train", 3, size=16, seed=0)
    val = write_dense_set(tmp_path / "val", 3, size=16, seed=1)
    for root in (train, val):
        save(root / "images" / "00001.png", np.zeros((32, 48, 3), np.uint8))  # 32 high, 48 wide
        target = np.asarray(Image.open(root / folder / "00001.png"))
        Image.fromarray(np.resize(target, (48, 32))).save(root / folder / "00001.png")  # 48 high, 32 wide
        small = np.asarray(Image.open(root / folder / "00002.png"))[::2, ::2].copy()
        Image.fromarray(small).save(root / folder / "00002.png")  # half the image's size: still its target
    extra = ["max_depth=10"] if task == "depth" else ["num_classes=9"]
    p = tiny_run(task, train, val, tmp_path / "out", *extra)["protocol"]
    assert (p["train_images"], p["train_bad_files"], p["val_images"], p["val_bad_files"]) == (2, 1, 2, 1)
    assert f"e.g. {train / folder / '00001.png'} (48x32 for a 32x48 image)" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_a_rerun_never_leaves_a_result_beside_another_runs_files(task, tmp_path, monkeypatch, capsys):
    """A rerun into an earlier out= overwrote the head and metrics.jsonl first and the result json
    last: stopped partway, it left the earlier json beside the new head, and a finished rerun with fewer
    examples kept the earlier run's example PNGs. The result json is now removed first, the earlier
    outputs with it, and written last."""
    from dinokit.eval import depth, segmentation

    train = write_dense_set(tmp_path / "train", 3, size=16, seed=0)
    val = write_dense_set(tmp_path / "val", 3, size=16, seed=1)
    extra = ["max_depth=10"] if task == "depth" else ["num_classes=9"]
    out = tmp_path / "out"
    first = tiny_run(task, train, val, out, *extra, "num_examples=3")
    assert len(list((out / "examples").iterdir())) == 3 and (out / f"{task}_head.safetensors").is_file()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stopped after the new head, before the examples and the result

    module = segmentation if task == "segmentation" else depth
    with monkeypatch.context() as m:
        m.setattr(module, "write_examples", killed)
        assert main(["eval", task, f"train={train}", f"val={val}", f"out={out}", *TINY, *extra, "seed=1"]) == 130
    assert not (out / f"{task}.json").exists() and not (out / "examples").exists()
    second = tiny_run(task, train, val, out, *extra, "num_examples=1", "seed=1")
    assert sorted(p.name for p in (out / "examples").iterdir()) == [Path(second["examples"][0]).name]
    assert second["training"] != first["training"]
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == second["training"]
    assert load_head_file(out / f"{task}_head.safetensors")[1]["seed"] == 1
    other = "depth" if task == "segmentation" else "segmentation"
    assert main(["eval", other, f"train={train}", f"val={val}", f"out={out}", *TINY]) == 2
    assert f"holds the results of eval {task}" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_a_second_run_into_an_out_folder_still_in_use_is_refused(task, tmp_path, monkeypatch, capsys):
    """Two runs at once into one out= were not kept apart: the second cleared and rewrote the head and
    metrics.jsonl while the first went on, which then wrote its result json beside the other's head.
    The second now fails at once, naming the folder, and the first one's files stay its own."""
    from dinokit.eval import depth, segmentation

    train = write_dense_set(tmp_path / "train", 3, size=16, seed=0)
    val = write_dense_set(tmp_path / "val", 3, size=16, seed=1)
    extra = ["max_depth=10"] if task == "depth" else ["num_classes=9"]
    out = tmp_path / "out"
    module = segmentation if task == "segmentation" else depth
    real_train = module.train_dense_head
    second: list[int | None] = []

    def train_while_another_run_starts(*args, **kwargs):
        if not second:  # the first run, between clearing out and writing its results
            second.append(None)
            second[0] = main(["eval", task, f"train={train}", f"val={val}", f"out={out}", *TINY, *extra, "seed=1"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(module, "train_dense_head", train_while_another_run_starts)
    first = tiny_run(task, train, val, out, *extra)
    assert second == [2]
    err = capsys.readouterr().err
    assert f"another process is writing eval {task} results in {out}" in err and "choose another folder" in err
    assert load_head_file(out / f"{task}_head.safetensors")[1]["seed"] == 0  # the first run's head
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == first["training"]
    assert tiny_run(task, train, val, out, *extra, "seed=1")["training"]  # the lock went with the first run


def save_tiny_head(task: str, path: Path) -> None:
    """A random head of `task` on the random `vit_nano_p2` backbone, saved as `dinokit eval` saves one."""
    from dinokit.eval.common import prepare_backbone
    from dinokit.eval.depth import LinearDepthHead
    from dinokit.eval.heads import head_metadata, save_head
    from dinokit.eval.segmentation import LinearSegmentationHead

    backbone = prepare_backbone("random:vit_nano_p2", "cpu", seed=0)
    dim = backbone.model.embed_dim
    if task == "segmentation":
        head, extra = LinearSegmentationHead(dim, 3), dict(num_classes=3, ignore_index=255)
    else:
        head = LinearDepthHead(dim, 1, 0.001, 10.0)
        extra = dict(with_cls=True, min_depth=0.001, max_depth=10.0, depth_scale=1000.0)
    save_head(path, head.eval(), head_metadata(backbone, 16, (1,), True, 0, task=task, **extra))


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_a_predict_rerun_leaves_only_its_own_predictions(task, tmp_path):
    """A rerun of predict into an earlier out= kept the predictions of images no longer in its input, so
    the folder mixed two runs. The earlier run's recorded files are now removed first; other files in
    out= stay."""
    save_tiny_head(task, tmp_path / "head.safetensors")
    for name in ("a.png", "sub/b.png", "c.png"):
        save(tmp_path / "in" / name, np.full((20, 30, 3), 90, np.uint8))
    out = tmp_path / "out"
    args = ["predict", task, f"head={tmp_path / 'head.safetensors'}", f"images={tmp_path / 'in'}", f"out={out}"]
    assert main([*args, "num_workers=0"]) == 0
    assert (out / "sub" / "b.png").is_file() and (out / "c.png").is_file()
    save(out / "legend.png", np.zeros((4, 4, 3), np.uint8))  # the user's own files in out=
    (out / "notes.txt").write_text("mine")
    (tmp_path / "in" / "sub" / "b.png").unlink()
    (tmp_path / "in" / "c.png").unlink()
    assert main([*args, "num_workers=0"]) == 0
    picture = "_overlay.png" if task == "segmentation" else "_depth.png"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert written == [".dinokit-predictions.json", ".dinokit.lock", "a.png", f"a{picture}", "legend.png", "notes.txt"]
    record = json.loads((out / ".dinokit-predictions.json").read_text())
    (out / ".dinokit-predictions.json").write_text(json.dumps({"files": [*record["files"], "../in/a.png"]}))
    assert main([*args, "num_workers=0"]) == 0
    assert (tmp_path / "in" / "a.png").is_file()  # nothing outside out= is removed
    save(out / "photo.jpg", np.full((20, 30, 3), 90, np.uint8))  # an input image inside out=
    record = json.loads((out / ".dinokit-predictions.json").read_text())
    (out / ".dinokit-predictions.json").write_text(json.dumps({"files": [*record["files"], "photo.jpg"]}))
    assert main([*args[:3], f"images={out / 'photo.jpg'}", f"out={out}", "num_workers=0"]) == 0
    assert (out / "photo.jpg").is_file() and (out / "photo.png").is_file()  # nor this run's input


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_a_predict_into_an_out_folder_in_use_is_refused(task, tmp_path, capsys):
    """Two predict runs at once into one out= each removed the other's recorded files and wrote their
    own beside them. A run into a folder that another run holds (predict or eval: one lock per folder)
    now fails at once and touches nothing there."""
    from dinokit.io import folder_lock

    save_tiny_head(task, tmp_path / "head.safetensors")
    save(tmp_path / "in" / "a.png", np.full((20, 30, 3), 90, np.uint8))
    out = tmp_path / "out"
    args = ["predict", task, f"head={tmp_path / 'head.safetensors'}", f"images={tmp_path / 'in'}", f"out={out}"]
    assert main([*args, "num_workers=0"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with folder_lock(out, "another run", wait=False):  # as a run in another process holds it
        assert main([*args, "num_workers=0"]) == 2
    assert f"another process is writing predictions in {out}" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main([*args, "num_workers=0"]) == 0  # the lock went with the run that held it


def test_a_damaged_predictions_record_names_a_fix_that_works(tmp_path):
    """A damaged .dinokit-predictions.json was read with read_json's default fix, 'download or export it
    again', which cannot apply to a predict run's record of its files."""
    from dinokit.eval.dense import PREDICTIONS_RECORD, replace_predictions

    out = tmp_path / "pred"
    replace_predictions(out, ["a.png"], [])
    (out / "a.png").write_bytes(b"earlier")
    (out / PREDICTIONS_RECORD).write_text('{"files": ["a.p')
    with pytest.raises(DinokitError, match=r"is not valid JSON") as error:
        replace_predictions(out, ["b.png"], [])
    assert "download or export" not in str(error.value) and f"remove {out / PREDICTIONS_RECORD}" in str(error.value)
    (out / PREDICTIONS_RECORD).unlink()  # the fix it names
    replace_predictions(out, ["b.png"], [])
    assert json.loads((out / PREDICTIONS_RECORD).read_text()) == {"files": ["b.png"]}


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_predict_decodes_jpegs_as_the_dense_head_was_trained(task, tmp_path, monkeypatch):
    """A dense head records that its features came through the reduced JPEG decode; predict decodes as
    recorded, and whole for a head written before the key (its features decoded whole). predict
    applied the reduced decode to every head."""
    from dinokit.data.images import decode_min_side
    from dinokit.eval import heads

    train = write_dense_set(tmp_path / "train", 3, size=16, seed=0)
    val = write_dense_set(tmp_path / "val", 1, size=16, seed=1)
    extra = ["max_depth=10"] if task == "depth" else ["num_classes=9"]
    tiny_run(task, train, val, tmp_path / "out", *extra)
    head = tmp_path / "out" / f"{task}_head.safetensors"
    seen = []
    real = heads.head_inputs
    monkeypatch.setattr(
        heads, "head_inputs", lambda b, p, m, w, t, **kw: seen.append(decode_min_side(t)) or real(b, p, m, w, t, **kw)
    )
    images = val / "images"
    assert main(["predict", task, f"head={head}", f"images={images}", f"out={tmp_path / 'p1'}", "num_workers=0"]) == 0
    state, meta = heads.load_head_file(head)
    assert meta["reduced_decode"] is True and seen == [2 * 16]
    del meta["reduced_decode"]
    heads.save_head(head, state, meta)
    assert main(["predict", task, f"head={head}", f"images={images}", f"out={tmp_path / 'p2'}", "num_workers=0"]) == 0
    assert seen[1] is None


def test_a_split_path_with_a_parent_step_is_read(tmp_path, monkeypatch):
    """train=../scenes/../scenes: read_pairs names the images by the plain path, and the pairs' keys were taken
    relative to the unplain one (a ValueError traceback from pathlib)."""
    write_dense_set(tmp_path / "scenes", 4, size=16, seed=0)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    split = "../scenes/../scenes"
    result = tiny_run("segmentation", Path(split), Path(split), tmp_path / "out", "num_examples=1")
    assert result["protocol"]["val_images"] == 4
    assert [Path(p).name for p in result["examples"]] == ["00000.png"]
