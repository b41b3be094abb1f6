"""The released DINOv2 depth heads (`dinokit.eval.released_depth`, `dinokit predict depth head=<released>`):
parity with a transcription of the official hub's computation, the released key layout, names, refusals.

No released weights are downloaded: head files are written here in the official format (random tensors under
"state_dict", the official key names) for a small random backbone."""

import argparse
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dinokit import create_model, export_model
from dinokit.cli import main
from dinokit.errors import DinokitError
from dinokit.eval.released_depth import DPTDepthHead, load_released_depth_head
from dinokit.models import hub
from tests.conftest import perturb_scales_and_norms

MICRO_BLOCKS = (0, 1, 2, 3)  # depth_blocks(4, 4): the 4-block micro backbone's blocks for linear4 / dpt


# ------------------------------------------ the official computation, transcribed (dinov2/hub/depth/*)
class OfficialConvModule(nn.Module):
    """mmcv ConvModule without norm: conv then activation, or activation then conv; ReLUs in place."""

    def __init__(self, cin, cout, k, padding=0, bias=True, act=False, act_first=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=bias)
        self.act_first = act_first
        if act:
            self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.act_first:
            x = self.activate(x)
        x = self.conv(x)
        if hasattr(self, "activate") and not self.act_first:
            x = self.activate(x)
        return x


class OfficialPreActResidualConvUnit(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = OfficialConvModule(c, c, 3, padding=1, bias=False, act=True, act_first=True)
        self.conv2 = OfficialConvModule(c, c, 3, padding=1, bias=False, act=True, act_first=True)

    def forward(self, inputs):
        inputs_ = inputs.clone()
        x = self.conv1(inputs)  # ReLU in place on `inputs`
        x = self.conv2(x)
        return x + inputs_


class OfficialFeatureFusionBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.project = OfficialConvModule(c, c, 1)
        self.res_conv_unit1 = OfficialPreActResidualConvUnit(c)
        self.res_conv_unit2 = OfficialPreActResidualConvUnit(c)

    def forward(self, *inputs):
        x = inputs[0]
        if len(inputs) == 2:
            if x.shape != inputs[1].shape:
                res = F.interpolate(inputs[1], size=(x.shape[2], x.shape[3]), mode="bilinear", align_corners=False)
            else:
                res = inputs[1]
            x = x + self.res_conv_unit1(res)
        x = self.res_conv_unit2(x)
        x = F.interpolate(x, None, 2, "bilinear", True)
        return self.project(x)


class OfficialReassembleBlocks(nn.Module):
    def __init__(self, d, outs):
        super().__init__()
        self.projects = nn.ModuleList([OfficialConvModule(d, o, 1) for o in outs])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(outs[0], outs[0], kernel_size=4, stride=4, padding=0),
                nn.ConvTranspose2d(outs[1], outs[1], kernel_size=2, stride=2, padding=0),
                nn.Identity(),
                nn.Conv2d(outs[3], outs[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.readout_projects = nn.ModuleList([nn.Sequential(nn.Linear(2 * d, d), nn.GELU()) for _ in outs])

    def forward(self, inputs):
        out = []
        for i, (x, cls_token) in enumerate(inputs):
            feature_shape = x.shape
            x = x.flatten(2).permute((0, 2, 1))
            readout = cls_token.unsqueeze(1).expand_as(x)
            x = self.readout_projects[i](torch.cat((x, readout), -1))
            x = x.permute(0, 2, 1).reshape(feature_shape)
            out.append(self.resize_layers[i](self.projects[i](x)))
        return out


class OfficialHeadDepth(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(c, c // 2, kernel_size=3, stride=1, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(c // 2, 32, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, kernel_size=1, stride=1, padding=0),
        )

    def forward(self, x):
        return self.head(x)


class OfficialDPTHead(nn.Module):
    def __init__(self, d, min_depth, channels=256):
        super().__init__()
        outs = [d // 2 ** (3 - i) for i in range(4)]
        self.reassemble_blocks = OfficialReassembleBlocks(d, outs)
        self.convs = nn.ModuleList([OfficialConvModule(o, channels, 3, padding=1, bias=False) for o in outs])
        self.fusion_blocks = nn.ModuleList([OfficialFeatureFusionBlock(channels) for _ in range(4)])
        self.fusion_blocks[0].res_conv_unit1 = None
        self.project = OfficialConvModule(channels, channels, 3, padding=1, act=True)
        self.conv_depth = OfficialHeadDepth(channels)
        self.min_depth = min_depth

    def forward(self, inputs):
        x = self.reassemble_blocks(list(inputs))
        x = [self.convs[i](feature) for i, feature in enumerate(x)]
        out = self.fusion_blocks[0](x[-1])
        for i in range(1, 4):
            out = self.fusion_blocks[i](out, x[-(i + 1)])
        out = self.project(out)
        return torch.relu(self.conv_depth(out)) + self.min_depth


class OfficialBNHead(nn.Module):
    """classify=True, UD bins, linear norm, upsample 4, resize_concat: features upsampled before the conv."""

    def __init__(self, d, layers, min_depth, max_depth):
        super().__init__()
        self.conv_depth = nn.Conv2d(d * layers * 2, 256, kernel_size=1)
        self.min_depth, self.max_depth = min_depth, max_depth

    def forward(self, inputs):
        maps = [torch.cat((x, c[:, :, None, None].expand_as(x)), 1) for x, c in inputs]
        size = [s * 4 for s in maps[0].shape[2:]]
        maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        logit = torch.relu(self.conv_depth(torch.cat(maps, dim=1))) + 0.1
        logit = logit / logit.sum(dim=1, keepdim=True)
        bins = torch.linspace(self.min_depth, self.max_depth, 256)
        return torch.einsum("ikmn,k->imn", [logit, bins]).unsqueeze(dim=1)


def center_padding(x, multiple):
    def pad(size):
        extra = math.ceil(size / multiple) * multiple - size
        return extra // 2, extra - extra // 2

    return F.pad(x, list(itertools.chain.from_iterable(pad(m) for m in x.shape[:1:-1])))


def official_depth(backbone, head, path: Path, blocks, min_depth, max_depth, size=None) -> np.ndarray:
    """The notebook's transform, CenterPadding, get_intermediate_layers, head, clamp, resize to `size` (default
    the image's; encode_decode)."""
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255.0  # ToTensor
    x = 255.0 * x[:3]
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    x = ((x - mean[:, None, None]) / std[:, None, None])[None]
    with torch.no_grad():
        feats = backbone.get_intermediate_layers(
            center_padding(x, backbone.patch_size), n=list(blocks), reshape=True, return_class_token=True, norm=False
        )
        out = torch.clamp(head(feats), min=min_depth, max=max_depth)
        out = F.interpolate(out, size=size or x.shape[2:], mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


# ---------------------------------------------------------------------------------------------- set-up
def save_released(path: Path, head: nn.Module, extra: dict | None = None) -> Path:
    """`head` as a released file: {"state_dict": {"decode_head.<key>": tensor}} (+ a backbone key to ignore)."""
    state = {f"decode_head.{k}": v.detach().clone() for k, v in head.state_dict().items()}
    torch.save({"state_dict": {**state, "backbone.pos_embed": torch.zeros(1)}, **(extra or {})}, path)
    return path


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A random 96-wide, 4-block, patch-4 backbone file, and images whose sides are no multiple of 4 (patch grids
    3 x 4, 2 x 2, 4 x 3: an odd side makes DPT resize a skip to the coarser map's upsampled size)."""
    root = tmp_path_factory.mktemp("released_depth")
    torch.manual_seed(0)
    net = perturb_scales_and_norms(create_model("vit_micro_p4")).eval()
    weights = export_model(net, root / "micro.safetensors")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (11, 14), "sub/b.png": (7, 6), "c.jpg": (13, 9)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name, quality=95)
    return {"root": root, "net": net, "weights": str(weights), "images": images}


def official_linear(layers: int, max_depth: float) -> OfficialBNHead:
    torch.manual_seed(1)
    head = OfficialBNHead(96, layers, 0.001, max_depth)
    with torch.no_grad():
        head.conv_depth.weight.normal_(0, 0.3)
        head.conv_depth.bias.normal_(0, 0.3)
    return head.eval()


def official_dpt(micro) -> OfficialDPTHead:
    """A random DPT head whose last conv is rescaled so that its depths on image a spread over 5 +- 2 m (at
    PyTorch's init they barely vary across the image, and a wrong skip or resize could pass unseen)."""
    torch.manual_seed(2)
    head = OfficialDPTHead(96, 0.001).eval()
    last, seen = head.conv_depth.head[4], []
    hook = last.register_forward_hook(lambda module, inputs, output: seen.append(output))
    official_depth(micro["net"], head, micro["images"] / "a.png", MICRO_BLOCKS, 0.001, 10.0)
    hook.remove()
    with torch.no_grad():
        std, mean = seen[0].std(), seen[0].mean()
        last.weight.mul_(2.0 / std)
        last.bias.copy_((last.bias - mean) * 2.0 / std + 5.0)
    return head


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", ["linear", "linear4", "dpt"])
def test_released_heads_compute_what_the_official_hub_computes(micro, kind, tmp_path):
    """Whole images of odd sizes (padding and the final resize exercised), fp32: the dinokit depther equals
    the transcription of the official depther to float rounding, and the CLI's 16-bit PNGs are its depths
    in millimetres, at each image's size."""
    layers = 1 if kind == "linear" else 4
    head = official_dpt(micro) if kind == "dpt" else official_linear(layers, 10.0)
    file = save_released(tmp_path / f"my_nyu_{kind}_head.pth", head)  # a name that says the dataset
    blocks = (3,) if kind == "linear" else MICRO_BLOCKS

    depther = load_released_depth_head(str(file), micro["weights"], "cpu")
    assert depther.blocks == blocks and (depther.min_depth, depther.max_depth) == (0.001, 10.0)
    out = tmp_path / "out"
    args = [f"head={file}", f"model={micro['weights']}", f"images={micro['images']}", f"out={out}"]
    assert main(["predict", "depth", *args, "precision=fp32", "device=cpu"]) == 0

    inside = 0
    for name in ("a.png", "sub/b.png", "c.jpg"):
        path = micro["images"] / name
        expected = official_depth(micro["net"], head, path, blocks, 0.001, 10.0)
        mine = depther.predict(path)
        assert mine.shape == expected.shape == np.asarray(Image.open(path)).shape[:2]
        assert np.abs(mine - expected).max() < 1e-4
        written = np.asarray(Image.open(out / f"{Path(name).with_suffix('')}.png"))
        assert written.dtype == np.uint16 and written.shape == expected.shape
        assert np.abs(written.astype(np.float64) - expected * 1000).max() <= 0.5 + 0.1  # mm, rounded
        assert (out / f"{Path(name).with_suffix('')}_depth.png").is_file()
        inside += ((expected > 0.0011) & (expected < 9.999)).mean()
    assert inside / 3 > 0.5  # mostly real depths, not the clamped ends


def test_flip_averages_with_the_mirror_images_depth_as_the_released_configs(micro, tmp_path):
    """flip=True (`eval depth head=`): the released configs' MultiScaleFlipAug(flip=True) through
    DepthEncoderDecoder.aug_test, the mean of the image's depth and of its mirror image's depth flipped back
    (each clamped and resized); padding is asymmetric on odd sides, so the mirror image is a second view."""
    head = official_dpt(micro)
    file = save_released(tmp_path / "my_nyu_dpt_head.pth", head)
    plain = load_released_depth_head(str(file), micro["weights"], "cpu", precision="fp32")
    flipped = load_released_depth_head(str(file), micro["weights"], "cpu", precision="fp32", flip=True)
    assert (plain.flip, flipped.flip) == (False, True)
    for name in ("a.png", "sub/b.png"):
        path = micro["images"] / name
        mirror = tmp_path / f"mirror-{Path(name).name}"
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirror)
        views = [
            official_depth(micro["net"], head, path, MICRO_BLOCKS, 0.001, 10.0),
            official_depth(micro["net"], head, mirror, MICRO_BLOCKS, 0.001, 10.0)[:, ::-1],
        ]
        expected = (views[0] + views[1]) / 2
        assert np.abs(flipped.predict(path) - expected).max() < 1e-4
        assert np.abs(plain.predict(path) - views[0]).max() < 1e-4
        assert np.abs(views[0] - views[1]).max() > 1e-3  # the mirror view is another prediction


def test_the_dpt_head_holds_the_released_keys_and_shapes_for_vits14():
    """The module tree notebooks/depth_estimation.ipynb prints for dinov2_vits14_nyu_dpt_head (48/96/192/384
    post-process channels, 256 fusion channels), as state-dict keys without `decode_head.`."""
    d, c, post = 384, 256, (48, 96, 192, 384)
    expected = {}
    for i, o in enumerate(post):
        expected[f"reassemble_blocks.projects.{i}.conv.weight"] = (o, d, 1, 1)
        expected[f"reassemble_blocks.projects.{i}.conv.bias"] = (o,)
        expected[f"reassemble_blocks.readout_projects.{i}.0.weight"] = (d, 2 * d)
        expected[f"reassemble_blocks.readout_projects.{i}.0.bias"] = (d,)
        expected[f"convs.{i}.conv.weight"] = (c, o, 3, 3)
        expected[f"fusion_blocks.{i}.project.conv.weight"] = (c, c, 1, 1)
        expected[f"fusion_blocks.{i}.project.conv.bias"] = (c,)
        for unit in ("res_conv_unit1", "res_conv_unit2") if i else ("res_conv_unit2",):
            for conv in ("conv1", "conv2"):
                expected[f"fusion_blocks.{i}.{unit}.{conv}.conv.weight"] = (c, c, 3, 3)
    expected |= {
        "reassemble_blocks.resize_layers.0.weight": (48, 48, 4, 4),
        "reassemble_blocks.resize_layers.0.bias": (48,),
        "reassemble_blocks.resize_layers.1.weight": (96, 96, 2, 2),
        "reassemble_blocks.resize_layers.1.bias": (96,),
        "reassemble_blocks.resize_layers.3.weight": (384, 384, 3, 3),
        "reassemble_blocks.resize_layers.3.bias": (384,),
        "project.conv.weight": (c, c, 3, 3),
        "project.conv.bias": (c,),
        "conv_depth.head.0.weight": (128, c, 3, 3),
        "conv_depth.head.0.bias": (128,),
        "conv_depth.head.2.weight": (32, 128, 3, 3),
        "conv_depth.head.2.bias": (32,),
        "conv_depth.head.4.weight": (1, 32, 1, 1),
        "conv_depth.head.4.bias": (1,),
    }
    found = {k: tuple(v.shape) for k, v in DPTDepthHead(d).state_dict().items()}
    assert found == expected
    assert {k: tuple(v.shape) for k, v in OfficialDPTHead(d, 0.001).state_dict().items()} == expected


def test_released_depth_head_names_and_urls():
    assert hub.released_head("dinov2_vitl14_kitti_dpt_head") == hub.HeadName("dinov2_vitl14", "depth", "kitti", "dpt")
    assert hub.released_head_url("dinov2_vitl14_kitti_dpt_head") == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_kitti_dpt_head.pth"
    )
    found = hub.released_head("dl/dinov2_vitg14_nyu_linear4_head.pth")
    assert found == hub.HeadName("dinov2_vitg14", "depth", "nyu", "linear4")
    assert hub.released_head_url("dinov2_vitg14_nyu_linear4_head.pth") is None  # a file name: local
    assert hub.released_head("dinov2_vits14_nyu_linear_head") == hub.HeadName("dinov2_vits14", "depth", "nyu", "linear")
    assert hub.released_head("dinov2_vits14_linear4_head").task == "classification"
    for not_a_head in ("dinov2_vits14_nyu_head", "dinov2_vits14_nyu_linear2_head"):
        assert hub.released_head(not_a_head) is None and hub.released_head_url(not_a_head) is None
    # no released backbone (none with registers has depth heads): the dataset and kind still read, no URL
    assert hub.released_head("dinov2_vits14_reg_nyu_dpt_head") == hub.HeadName(None, "depth", "nyu", "dpt")
    assert hub.released_head_url("dinov2_vits14_reg_nyu_dpt_head") is None
    assert hub.released_head("my_kitti_linear_head.pth") == hub.HeadName(None, "depth", "kitti", "linear")


def test_kitti_range_png_units_and_max_depth(micro, tmp_path, capsys):
    """KITTI: 0.001-80 m and PNG units of 1/256 m (80 000 mm would not fit 16 bits); max_depth=10 gives the
    hub's own (10 m) bins for its KITTI linear head."""
    head = official_linear(4, 80.0)
    file = save_released(tmp_path / "my_kitti_linear4_head.pth", head)
    out = tmp_path / "out"
    args = [f"head={file}", f"model={micro['weights']}", f"images={micro['images'] / 'a.png'}", "precision=fp32"]
    assert main(["predict", "depth", *args, f"out={out}"]) == 0
    assert "range 0.001-80 m, PNG units 1/256 m" in capsys.readouterr().out
    expected = official_depth(micro["net"], head, micro["images"] / "a.png", MICRO_BLOCKS, 0.001, 80.0)
    written = np.asarray(Image.open(out / "a.png")).astype(np.float64)
    assert np.abs(written - expected * 256).max() <= 0.5 + 0.1 and expected.max() > 10  # the 80 m bins
    hub_like = load_released_depth_head(str(file), micro["weights"], "cpu", max_depth=10)
    tenth = official_depth(micro["net"], official_linear(4, 10.0), micro["images"] / "a.png", MICRO_BLOCKS, 0.001, 10)
    assert np.abs(hub_like.predict(micro["images"] / "a.png") - tenth).max() < 1e-4


def test_bf16_backbone_stays_close_to_fp32(micro, tmp_path):
    file = save_released(tmp_path / "my_nyu_dpt_head.pth", official_dpt(micro))
    fp32 = load_released_depth_head(str(file), micro["weights"], "cpu").predict(micro["images"] / "a.png")
    bf16 = load_released_depth_head(str(file), micro["weights"], "cpu", precision="bf16")
    difference = np.abs(bf16.predict(micro["images"] / "a.png") - fp32).mean()
    assert 0 < difference < 0.05 * fp32.mean()  # bf16 ran (the depths differ), and stayed close


def test_wrong_backbones_and_files_are_refused_clearly(micro, tmp_path, capsys):
    images = f"images={micro['images']}"
    weights = micro["weights"]
    # a released name says ViT-S/14: the 96-wide micro backbone is refused before any head is built
    named = save_released(tmp_path / "dinov2_vits14_nyu_linear4_head.pth", official_linear(4, 10.0))
    assert main(["predict", "depth", f"head={named}", f"model={weights}", images, f"out={tmp_path / 'o'}"]) == 2
    assert "was released for dinov2_vits14" in capsys.readouterr().err
    # a head of another width: its keys' shapes and the backbone it expects are named
    wide = OfficialBNHead(192, 4, 0.001, 10.0)
    with pytest.raises(DinokitError, match=r"conv_depth.weight \(256, 1536, 1, 1\) \(wanted \(256, 768, 1, 1\)\)"):
        load_released_depth_head(str(save_released(tmp_path / "x_nyu_linear4_head.pth", wide)), weights, "cpu")
    dpt_as_linear = save_released(tmp_path / "x_nyu_linear_head.pth", official_dpt(micro))
    with pytest.raises(DinokitError, match=r"missing \['conv_depth.bias', 'conv_depth.weight'\]; unexpected"):
        load_released_depth_head(str(dpt_as_linear), weights, "cpu")
    # not a depth head: a classification head, a bare tensor
    torch.save({"weight": torch.zeros(1000, 192), "bias": torch.zeros(1000)}, tmp_path / "cls_nyu_linear_head.pth")
    assert main(["predict", "depth", f"head={tmp_path / 'cls_nyu_linear_head.pth'}", f"model={weights}", images]) == 2
    assert "is not a DINOv2 depth head" in capsys.readouterr().err
    torch.save(torch.zeros(3), tmp_path / "t_nyu_dpt_head.pth")
    with pytest.raises(DinokitError, match="this file a Tensor"):
        load_released_depth_head(str(tmp_path / "t_nyu_dpt_head.pth"), weights, "cpu")
    # an mmcv meta record of Python objects: not unpickled
    with_meta = save_released(
        tmp_path / "m_nyu_linear4_head.pth", official_linear(4, 10.0), {"meta": argparse.Namespace()}
    )
    with pytest.raises(DinokitError, match="holds Python objects besides its weights"):
        load_released_depth_head(str(with_meta), weights, "cpu")
    # a name that says neither dataset nor backbone
    plain = save_released(tmp_path / "head.pth", official_linear(4, 10.0))
    with pytest.raises(DinokitError, match=r"pass max_depth=10 .* or max_depth=80"):
        load_released_depth_head(str(plain), weights, "cpu")
    with pytest.raises(DinokitError, match="pass the backbone it was trained on as model="):
        load_released_depth_head(str(plain), None, "cpu", max_depth=10)
    assert load_released_depth_head(str(plain), weights, "cpu", max_depth=10).blocks == MICRO_BLOCKS
    # max_depth= is a released head's key only
    dinokit_head = ["head=out/depth_head.safetensors", images, f"out={tmp_path / 'o'}", "max_depth=5"]
    assert main(["predict", "depth", *dinokit_head]) == 2
    assert "max_depth= applies to released heads" in capsys.readouterr().err


def test_a_released_name_is_downloaded_once_and_offline_says_what_to_do(tmp_path, monkeypatch, capsys):
    """Offline, the name fails naming the file to pass as head=; a copy in the cache makes the name work (here
    on a random-init ViT-S/14, the architecture the name says)."""

    def offline(url, dst, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 31, 3), dtype=np.uint8)).save(image)
    args = ["predict", "depth", "head=dinov2_vits14_nyu_linear_head", "model=random:dinov2_vits14", f"images={image}"]
    assert main([*args, f"out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "offline" in err and "head=/path/to/dinov2_vits14_nyu_linear_head.pth" in err

    torch.manual_seed(3)
    hub.cache_dir().mkdir(parents=True, exist_ok=True)
    save_released(hub.cache_dir() / "dinov2_vits14_nyu_linear_head.pth", OfficialBNHead(384, 1, 0.001, 10.0))
    assert main([*args, f"out={tmp_path / 'out'}", "precision=fp32"]) == 0
    depth = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    assert depth.shape == (20, 31) and depth.min() >= 1 and depth.max() <= 10000


def test_a_depth_pth_named_like_a_classifier_is_not_refused(micro, tmp_path):
    """A user's depth head file ending in _linear4_head.pth (no released backbone, no dataset in its name) is a
    depth head given model= and max_depth=: it was refused as 'a released DINOv2 classification head'."""
    head = official_linear(4, 10.0)
    file = save_released(tmp_path / "nyu_linear4_head.pth", head)
    depther = load_released_depth_head(str(file), micro["weights"], "cpu", max_depth=10)
    expected = official_depth(micro["net"], head, micro["images"] / "a.png", MICRO_BLOCKS, 0.001, 10.0)
    assert np.abs(depther.predict(micro["images"] / "a.png") - expected).max() < 1e-4
    # a released classifier's own name still names its command
    with pytest.raises(DinokitError, match="use `dinokit predict classification"):
        load_released_depth_head("dinov2_vits14_linear4_head", micro["weights"], "cpu", max_depth=10)


def test_a_photo_over_max_pixels_runs_shrunk_and_its_depth_comes_at_its_size(micro, tmp_path, monkeypatch, capsys):
    """A 4000 x 3000 photo ran whole (a DPT head on ViT-S: some 27 GB); above max_pixels an image runs at the
    largest size within them (PIL bilinear), the depth resized straight to the image's size."""
    head = official_linear(4, 10.0)
    file = save_released(tmp_path / "my_nyu_linear4_head.pth", head)
    depther = load_released_depth_head(str(file), micro["weights"], "cpu", max_pixels=100)
    assert load_released_depth_head(str(file), micro["weights"], "cpu").max_pixels == 1_000_000
    path = micro["images"] / "a.png"  # 14 x 11 = 154 pixels
    assert depther.run_size(14, 11) == (11, 8) and depther.run_size(10, 10) == (10, 10)
    Image.open(path).convert("RGB").resize((11, 8), Image.Resampling.BILINEAR).save(tmp_path / "small.png")
    expected = official_depth(micro["net"], head, tmp_path / "small.png", MICRO_BLOCKS, 0.001, 10.0, size=(11, 14))
    assert np.abs(depther.predict(path) - expected).max() < 1e-4
    with pytest.raises(DinokitError, match="max_pixels must be a positive number"):
        load_released_depth_head(str(file), micro["weights"], "cpu", max_pixels=0)

    # the command: a 1500 x 1000 photo reaches the depther within 1 000 000 pixels, its PNG at 1500 x 1000
    seen = []

    def forward(self, images, size=None):
        seen.append((tuple(images.shape[-2:]), size))
        return torch.ones(1, 1, *size)

    monkeypatch.setattr("dinokit.eval.released_depth.ReleasedDepther.forward", forward)
    Image.new("RGB", (1500, 1000)).save(tmp_path / "photo.png")
    args = [f"head={file}", f"model={micro['weights']}", f"images={tmp_path / 'photo.png'}", f"out={tmp_path / 'o'}"]
    assert main(["predict", "depth", *args]) == 0
    assert seen == [((816, 1224), (1000, 1500))] and 816 * 1224 <= 1_000_000
    assert np.asarray(Image.open(tmp_path / "o" / "photo.png")).shape == (1000, 1500)
    assert "1 image(s) of more than 1000000 pixels ran shrunk" in capsys.readouterr().out
    # the command's max_pixels= key: none runs it whole, a number sets the limit
    seen.clear()
    assert main(["predict", "depth", *args, "max_pixels=none"]) == 0
    assert main(["predict", "depth", *args, "max_pixels=15000"]) == 0
    assert seen == [((1000, 1500), (1000, 1500)), ((100, 150), (1000, 1500))]


def test_a_segmentation_head_given_to_predict_depth_is_told_its_command(micro, tmp_path):
    """A released segmentation head's file (decode_head.bn / conv_seg) was told to pass another backbone as
    model= (its keys 'do not fit a DPT head'); it is told to use predict segmentation."""
    state = {"bn.weight": torch.ones(96), "bn.bias": torch.zeros(96), "bn.running_mean": torch.zeros(96)}
    state |= {
        "bn.running_var": torch.ones(96),
        "conv_seg.weight": torch.zeros(5, 96, 1, 1),
        "conv_seg.bias": torch.zeros(5),
    }
    torch.save({"state_dict": {f"decode_head.{k}": v for k, v in state.items()}}, tmp_path / "seg.pth")
    with pytest.raises(DinokitError, match=r"a DINOv2 segmentation head .* use `dinokit predict segmentation head="):
        load_released_depth_head(str(tmp_path / "seg.pth"), micro["weights"], "cpu", max_depth=10)
