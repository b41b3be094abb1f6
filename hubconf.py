"""torch.hub entry points: `torch.hub.load("<owner>/dinokit", "dinov2_vits14")`, as the official repos.

The entry names and the `pretrained` keyword are those of facebookresearch/dinov2 and
facebookresearch/dino (their ViTs): the same call with this repository's name gives a dinokit
`VisionTransformer` with the released weights (downloaded once into `$DINOKIT_CACHE`; offline, the
error says how to pass a local file to `dinokit.load_model` instead). `pretrained=False` gives the
architecture at random init. Other keywords are architecture options (`ViTConfig` fields), e.g.
`interpolate_offset=0.0`.

    model = torch.hub.load("path/to/dinokit", "dinov2_vits14_reg", source="local", pretrained=False)
"""

import sys as _sys
from collections.abc import Callable as _Callable
from pathlib import Path as _Path

dependencies = ["torch", "torchvision", "numpy", "safetensors", "huggingface_hub", "yaml"]

if "dinokit" not in _sys.modules:  # the package of this checkout, not another installed version
    _sys.path.insert(0, str(_Path(__file__).resolve().parent / "src"))

# torch.hub.list shows every public callable of this file: imported names stay private
from dinokit.models.architectures import create_model as _create_model  # noqa: E402
from dinokit.models.loading import load_model as _load_model  # noqa: E402


def _entry(name: str, weights: str) -> _Callable:
    def entry(*, pretrained: bool = True, **overrides):
        return _load_model(name, **overrides) if pretrained else _create_model(name, **overrides)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{name}: {weights} (pretrained=True, downloaded once), or random init (pretrained=False). "
        "Keywords: architecture options (ViTConfig fields)."
    )
    return entry


dinov2_vits14 = _entry("dinov2_vits14", "DINOv2 ViT-S/14 (LVD-142M)")
dinov2_vitb14 = _entry("dinov2_vitb14", "DINOv2 ViT-B/14 (LVD-142M)")
dinov2_vitl14 = _entry("dinov2_vitl14", "DINOv2 ViT-L/14 (LVD-142M)")
dinov2_vitg14 = _entry("dinov2_vitg14", "DINOv2 ViT-g/14 (LVD-142M)")
dinov2_vits14_reg = _entry("dinov2_vits14_reg", "DINOv2 ViT-S/14 with 4 registers (LVD-142M)")
dinov2_vitb14_reg = _entry("dinov2_vitb14_reg", "DINOv2 ViT-B/14 with 4 registers (LVD-142M)")
dinov2_vitl14_reg = _entry("dinov2_vitl14_reg", "DINOv2 ViT-L/14 with 4 registers (LVD-142M)")
dinov2_vitg14_reg = _entry("dinov2_vitg14_reg", "DINOv2 ViT-g/14 with 4 registers (LVD-142M)")
dino_vits16 = _entry("dino_vits16", "DINO ViT-S/16 (ImageNet-1k)")
dino_vits8 = _entry("dino_vits8", "DINO ViT-S/8 (ImageNet-1k)")
dino_vitb16 = _entry("dino_vitb16", "DINO ViT-B/16 (ImageNet-1k)")
dino_vitb8 = _entry("dino_vitb8", "DINO ViT-B/8 (ImageNet-1k)")
