"""timm state dicts (`vit_*_patch14_dinov2`, `_reg4_`, DINO v1 `vit_small_patch16_224`) load with the
same outputs."""

import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn

import dinokit
from dinokit.models.formats.timm import timm_to_official
from tests.conftest import perturb_scales_and_norms


def timm_model(name: str, **kw):
    model = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    return perturb_scales_and_norms(model).eval()


def check(tm, ours, x, registers: int) -> None:
    with torch.no_grad():
        ref = tm.forward_features(x)  # normed tokens: [CLS, REG, PATCH]
        out = ours.forward_features(x)
    assert (ref[:, 0] - out["x_norm_clstoken"]).abs().max() <= 1e-4
    assert (ref[:, 1 + registers :] - out["x_norm_patchtokens"]).abs().max() <= 1e-4
    if registers:
        assert (ref[:, 1 : 1 + registers] - out["x_norm_regtokens"]).abs().max() <= 1e-4


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_vit_small_patch14_dinov2(tmp_path, suffix):
    tm = timm_model("vit_small_patch14_dinov2", img_size=224)
    path = tmp_path / f"timm.{suffix}"
    sd = tm.state_dict()
    torch.save(sd, path) if suffix == "pth" else save_file(sd, path)
    ours = dinokit.load_model(path)
    assert ours.config.num_register_tokens == 0 and ours.config.img_size == 224
    check(tm, ours, torch.randn(2, 3, 224, 224), 0)


def test_vit_small_patch14_reg4_dinov2_at_native_and_other_sizes(tmp_path):
    tm = timm_model("vit_small_patch14_reg4_dinov2", img_size=224, dynamic_img_size=True)
    assert "reg_token" in tm.state_dict() and tm.state_dict()["pos_embed"].shape[1] == 256
    torch.save(tm.state_dict(), tmp_path / "reg.pth")
    ours = dinokit.load_model(tmp_path / "reg.pth")
    assert ours.config.num_register_tokens == 4
    check(tm, ours, torch.randn(2, 3, 224, 224), 4)
    check(tm, ours, torch.randn(1, 3, 168, 308), 4)  # timm resamples like the official reg models


def test_dino_v1_vit_small_patch16(tmp_path):
    tm = timm_model("vit_small_patch16_224")
    torch.save(tm.state_dict(), tmp_path / "dino.pth")
    ours = dinokit.load_model(tmp_path / "dino.pth")
    assert ours.config.init_values is None and ours.config.patch_size == 16
    assert dinokit.count_parameters(ours) == 21_665_664
    check(tm, ours, torch.randn(2, 3, 224, 224), 0)


def test_giant_packed_swiglu_maps_to_w12_w3(tmp_path):
    tm = timm_model("vit_giant_patch14_dinov2", img_size=28, depth=2)
    torch.save(tm.state_dict(), tmp_path / "g.pth")
    ours = dinokit.load_model(tmp_path / "g.pth")
    assert ours.config.ffn_layer == "swiglu"
    check(tm, ours, torch.randn(1, 3, 28, 28), 0)


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_a_timm_dinov2_exports_to_an_official_file_that_the_official_code_and_timm_load(tmp_path, name):
    """timm drops DINOv2's mask token: a timm file read by dinokit and written as an official .pth lacked
    `mask_token`, so the official model's strict load failed, and timm, which recognises DINOv2 files by
    that key, no longer converted the registers and CLS position (missing reg_token, pos_embed mismatch)."""
    tm = timm_model(name, img_size=56, depth=2, dynamic_img_size=True)
    torch.save(tm.state_dict(), tmp_path / "timm.pth")
    path = dinokit.export_model(dinokit.load_model(tmp_path / "timm.pth"), tmp_path / "official.pth")
    sd = torch.load(path, weights_only=True)
    arch = "dinov2_vits14_reg" if "reg4" in name else "dinov2_vits14"
    official = dinokit.create_model(arch, depth=2, img_size=56)
    assert set(sd) == set(official.state_dict())  # keys of the official model (hub: strict=True)
    back = timm.create_model(name, pretrained=False, num_classes=0, img_size=56, depth=2, dynamic_img_size=True)
    back.load_state_dict(checkpoint_filter_fn(sd, back))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert (back.eval().forward_features(x) - tm.forward_features(x)).abs().max() <= 1e-5


@pytest.mark.parametrize(("name", "size"), [("vit_small_patch14_dinov2", 56), ("vit_small_patch16_224", 64)])
def test_timm_without_registers_off_grid_follows_the_official_model_and_overrides_reproduce_timm(tmp_path, name, size):
    """timm resamples with an output size and antialias for every model; DINO / DINOv2 without registers
    resample with the +0.1 offset and no antialias. dinokit follows the official model by default."""
    tm = timm_model(name, img_size=size, depth=2, dynamic_img_size=True)
    with torch.no_grad():
        tm.pos_embed.normal_()
    torch.save(tm.state_dict(), tmp_path / "timm.pth")
    official = dinokit.load_model(tmp_path / "timm.pth")
    assert (official.config.interpolate_offset, official.config.interpolate_antialias) == (0.1, False)
    x = torch.randn(1, 3, size - size // 4, 2 * size - size // 4)
    with torch.no_grad():
        assert (tm.forward_features(x)[:, 1:] - official.forward_features(x)["x_norm_patchtokens"]).abs().max() > 1e-2
    check(tm, dinokit.load_model(tmp_path / "timm.pth", interpolate_offset=0.0, interpolate_antialias=True), x, 0)


@pytest.mark.parametrize(("name", "size"), [("vit_small_patch14_reg4_dinov2", 56), ("vit_small_patch16_224", 64)])
def test_a_timm_hub_folder_loads(tmp_path, name, size):
    """What timm writes for the Hub (`save_for_hf`: config.json with `architecture`, no `model_type`)."""
    from timm.models._hub import save_for_hf

    tm = timm_model(name, img_size=size, depth=2)
    save_for_hf(tm, tmp_path / "hub")
    assert "architecture" in json.loads((tmp_path / "hub" / "config.json").read_text())
    ours = dinokit.load_model(tmp_path / "hub")
    check(tm, ours, torch.randn(1, 3, size, size), ours.num_register_tokens)


@pytest.mark.parametrize("size", ["small", "base", "large", "giant"])
@pytest.mark.parametrize("registers", [False, True])
def test_full_size_timm_dinov2_keys_and_shapes_equal_the_official_ones_both_ways(size, registers):
    """Every released DINOv2 size, on the meta device: timm's model maps onto the official layout (ViT-g's
    packed SwiGLU included), and timm's own filter reads the official layout dinokit exports."""
    name = f"vit_{size}_patch14_{'reg4_' if registers else ''}dinov2"
    arch = f"dinov2_vit{size[0]}14{'_reg' if registers else ''}"
    with torch.device("meta"):
        tm = timm.create_model(name, pretrained=False, num_classes=0)
        ours = dinokit.create_model(arch)
    official = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in timm_to_official(tm.state_dict()).items()} == official
    filtered = checkpoint_filter_fn({k: torch.empty(v, device="meta") for k, v in official.items()}, tm)
    assert {k: v.shape for k, v in filtered.items()} == {k: v.shape for k, v in tm.state_dict().items()}


@pytest.mark.parametrize(
    ("name", "img_size"),
    [
        ("vit_small_patch14_dinov2", (224, 280)),  # 16 x 20 grid + CLS row
        ("vit_small_patch14_reg4_dinov2", (224, 280)),  # 16 x 20 grid, no CLS row (no_embed_class)
        ("vit_small_patch14_reg4_dinov2", (140, 238)),  # 10 x 17 = 13 * 13 + 1: no CLS row, so not 13 x 13
        ("vit_small_patch16_224", (224, 288)),  # DINO v1 (read as the official layout): 14 x 18 + CLS
    ],
)
def test_a_timm_model_with_a_rectangular_grid_is_a_clear_error(tmp_path, name, img_size):
    """timm builds a rectangular position grid for img_size=(224, 280); dinokit's model (as the official
    one) stores a square grid, and the load ended in a shape mismatch against a guessed square grid
    ('file (1, 321, 384) vs model (1, 325, 384)'), or for register models a wrong CLS row."""
    tm = timm_model(name, img_size=img_size, depth=1)
    torch.save(tm.state_dict(), tmp_path / "timm.pth")
    patches = (img_size[0] // tm.patch_embed.patch_size[0]) * (img_size[1] // tm.patch_embed.patch_size[1])
    with pytest.raises(dinokit.DinokitError, match=rf"{patches} patch positions, which is no square grid") as e:
        dinokit.load_model(tmp_path / "timm.pth")
    assert "square img_size" in str(e.value) and "resample_abs_pos_embed" in str(e.value)
