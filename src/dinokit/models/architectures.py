"""Named architectures: the released DINOv2 / DINO models, and small ViTs for CPU-scale work.

`create_model(name, **overrides)` builds a randomly initialised model; `load_model` (in
`dinokit.models.loading`) builds one from weights.
"""

import math
from dataclasses import replace

from dinokit.models.vision_transformer import VisionTransformer, ViTConfig

# The hub models (`dinov2/hub/backbones.py`): img_size 518, patch 14, LayerScale, offset 0.1 (no registers)
# or offset 0 + antialias (registers).
_DINOV2_SIZES = {
    "s": dict(embed_dim=384, depth=12, num_heads=6),
    "b": dict(embed_dim=768, depth=12, num_heads=12),
    "l": dict(embed_dim=1024, depth=24, num_heads=16),
    "g": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
}
_DINOV2_BASE = dict(img_size=518, patch_size=14, init_values=1.0, interpolate_offset=0.1, interpolate_antialias=False)
_REGISTERS = dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
# DINO v1 (`dino:vision_transformer.py`): 224 grid, no LayerScale, offset 0.1.
_DINO_BASE = dict(img_size=224, init_values=None, mask_token=False, interpolate_offset=0.1, interpolate_antialias=False)

ARCHITECTURES: dict[str, ViTConfig] = {}
for _s, _size in _DINOV2_SIZES.items():
    ARCHITECTURES[f"dinov2_vit{_s}14"] = ViTConfig(**_DINOV2_BASE, **_size)
    ARCHITECTURES[f"dinov2_vit{_s}14_reg"] = ViTConfig(**{**_DINOV2_BASE, **_size, **_REGISTERS})
for _s, _size in (("s", _DINOV2_SIZES["s"]), ("b", _DINOV2_SIZES["b"])):
    for _p in (16, 8):
        ARCHITECTURES[f"dino_vit{_s}{_p}"] = ViTConfig(**_DINO_BASE, patch_size=_p, **_size)

# Small ViTs for 32-96 px images on a CPU. LayerScale 1e-5 (the DINOv2 training value), no registers.
_SMALL = dict(init_values=1e-5, interpolate_offset=0.0, interpolate_antialias=True)
ARCHITECTURES.update(
    {
        "vit_tiny_p16": ViTConfig(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, **_SMALL),
        "vit_tiny_p8": ViTConfig(img_size=96, patch_size=8, embed_dim=192, depth=12, num_heads=3, **_SMALL),
        "vit_tiny_p4": ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, **_SMALL),
        "vit_mini_p4": ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, **_SMALL),
        "vit_micro_p4": ViTConfig(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, **_SMALL),
        "vit_micro_p8": ViTConfig(img_size=96, patch_size=8, embed_dim=96, depth=4, num_heads=3, **_SMALL),
        "vit_nano_p2": ViTConfig(img_size=16, patch_size=2, embed_dim=32, depth=2, num_heads=2, **_SMALL),
    }
)


def get_config(name: str, **overrides) -> ViTConfig:
    """The ViTConfig of a named architecture, with `overrides` applied."""
    if name not in ARCHITECTURES:
        import difflib

        close = difflib.get_close_matches(name, ARCHITECTURES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown architecture {name!r}.{hint} Known: {', '.join(ARCHITECTURES)}.")
    unknown = set(overrides) - set(ViTConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(
            f"Unknown architecture options {sorted(unknown)}; valid: {sorted(ViTConfig.__dataclass_fields__)}"
        )
    return replace(ARCHITECTURES[name], **overrides)


def create_model(name: str, **overrides) -> VisionTransformer:
    """A randomly initialised model of a named architecture, e.g. create_model("dinov2_vits14_reg")."""
    return VisionTransformer(get_config(name, **overrides))


def mlp_ratio_for_width(hidden: int, dim: int) -> float:
    """An MLP ratio r with int(dim * r) == hidden, as a block computes its MLP width from r (the official
    rule). hidden / dim itself can land just below: 224 * (488 / 224) = 487.99..."""
    ratio = hidden / dim
    while int(dim * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def count_parameters(model) -> int:
    """Number of parameter values of `model` (every tensor's numel, trainable or not), as the released
    counts are given (dinov2_vits14: 22,056,576)."""
    return sum(p.numel() for p in model.parameters())


# What makes two models the same network: weights of one fit the other and give the same outputs.
# (img_size only sets the stored position grid, which is resampled to any input; drop path only trains;
# a mask token and LayerScale of 1 change no output.)
NETWORK_FIELDS = (
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "ffn_layer",
    "num_register_tokens",
    "interpolate_offset",
    "interpolate_antialias",
)


def architecture_name(config: ViTConfig) -> str:
    """The named architecture `config` is (same network, any position grid), else 'custom (nearest: X)'."""
    key = [getattr(config, f) for f in NETWORK_FIELDS]
    for name, named in ARCHITECTURES.items():
        if [getattr(named, f) for f in NETWORK_FIELDS] == key:
            return name
    return f"custom (nearest: {nearest_architecture(config)})"


def nearest_architecture(config: ViTConfig) -> str:
    """Name of the known architecture closest to `config` (width, depth, patch, registers, FFN)."""

    def distance(c: ViTConfig) -> tuple:
        return (
            abs(c.embed_dim - config.embed_dim) // 64,
            abs(c.depth - config.depth),
            c.patch_size != config.patch_size,
            c.num_register_tokens != config.num_register_tokens,
            c.ffn_layer != config.ffn_layer,
            (c.init_values is None) != (config.init_values is None),
        )

    return min(ARCHITECTURES, key=lambda n: distance(ARCHITECTURES[n]))
