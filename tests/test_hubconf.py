"""hubconf.py: torch.hub.load of this repository, as users load the official dinov2 / dino repos."""

from pathlib import Path

import pytest
import torch

import dinokit
from dinokit.models.hub import HF_NAMES, official_url

ROOT = str(Path(__file__).resolve().parents[1])
DINO_V1 = ["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8"]


def hub_module():
    """hubconf as torch.hub imports it (torch.hub.list and help take GitHub repos only)."""
    module = torch.hub._import_module("hubconf", str(Path(ROOT) / "hubconf.py"))
    torch.hub._check_dependencies(module)  # what torch.hub.load checks first
    return module


def test_lists_the_released_names_and_nothing_else():
    module = hub_module()
    listed = [f for f in dir(module) if callable(getattr(module, f)) and not f.startswith("_")]  # torch.hub.list
    assert sorted(listed) == sorted([*HF_NAMES, *DINO_V1])


def test_random_init_has_the_released_parameter_count():
    model = torch.hub.load(ROOT, "dinov2_vits14_reg", source="local", pretrained=False)
    assert isinstance(model, dinokit.VisionTransformer)
    assert dinokit.count_parameters(model) == 22_058_112
    assert model.num_register_tokens == 4


def test_pretrained_reads_the_released_file_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path))
    released = dinokit.create_model("dino_vits16")
    torch.nn.init.normal_(released.cls_token)
    dinokit.export_model(released, tmp_path / official_url("dino_vits16").rsplit("/", 1)[-1])

    model = torch.hub.load(ROOT, "dino_vits16", source="local")  # pretrained=True is the default
    assert not model.training
    for key, value in released.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_keywords_are_architecture_options():
    model = torch.hub.load(ROOT, "dinov2_vits14", source="local", pretrained=False, img_size=224)
    assert model.pos_embed.shape[1] == 1 + 16 * 16
    with pytest.raises(TypeError, match="Unknown architecture options"):
        torch.hub.load(ROOT, "dinov2_vits14", source="local", pretrained=False, depht=3)


def test_help_describes_the_entry():
    assert "DINOv2 ViT-B/14 with 4 registers" in hub_module().dinov2_vitb14_reg.__doc__  # torch.hub.help
