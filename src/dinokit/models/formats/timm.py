"""timm layout of `vit_*_patch14_dinov2` and `vit_*_patch14_reg4_dinov2`.

timm keeps the official names except: no mask token (restored as zeros for DINOv2); register models
are `no_embed_class` (the CLS position embedding is folded into `cls_token` and `pos_embed` covers
patches only; registers are `reg_token`); ViT-g's SwiGLU is `mlp.fc1` / `mlp.fc2` (packed, act(x1) * x2
as the official w12 / w3).
"""

import math

import torch

from dinokit.models.vision_transformer import rectangular_grid_error


def is_timm(sd: dict[str, torch.Tensor]) -> bool:
    """timm files have `reg_token`, or a `pos_embed` without a CLS row, or packed SwiGLU fc1/fc2, or
    LayerScale without a mask token (`vit_*_patch14_dinov2`: official DINOv2 backbones always have
    `mask_token`, and DINO v1, which has none, has no LayerScale either)."""
    if "reg_token" in sd:
        return True
    n = sd["pos_embed"].shape[1] if "pos_embed" in sd else 0
    if n and int(n**0.5) ** 2 == n:
        return True
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
        return True
    return has_layer_scale(sd) and "mask_token" not in sd


def has_layer_scale(sd: dict[str, torch.Tensor]) -> bool:
    """True if any block of `sd` has a LayerScale gamma (DINOv2 does, DINO v1 does not)."""
    return any(k.startswith("blocks.") and k.endswith((".ls1.gamma", ".ls2.gamma")) for k in sd)


def timm_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm state dict -> official names. The CLS position row is set to 0 when timm folded it into
    the token: cls_token + 0 is the same sum, and only patch rows are ever interpolated. DINOv2 models
    (LayerScale) get back the mask token timm drops, as zeros (the official init): the official model
    loads strictly and timm recognises a DINOv2 file by it, so an official export must hold it.

    A grid built for a rectangular img_size (timm's img_size=(224, 280)) is a DinokitError where its size
    shows it: register models with a number of rows that is not square (they have no CLS row), others with
    neither a square number of rows nor one more. The flat `pos_embed` does not store the grid's sides, so
    a rectangle with a square number of patches (4 x 16) cannot be told from a square, nor, in a file
    without registers, one with a square number of rows (16 x 18 patches + CLS = 17 x 17: read as a
    17 x 17 grid without a CLS row, as in no_embed_class files)."""
    out = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}
    if has_layer_scale(out) and "mask_token" not in out and "cls_token" in out:
        cls = out["cls_token"]
        out["mask_token"] = torch.zeros(1, cls.shape[-1], dtype=cls.dtype)
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
    pos = out.get("pos_embed")
    if pos is not None and _is_square(pos.shape[1]):
        out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    elif pos is not None and ("register_tokens" in out or not _is_square(pos.shape[1] - 1)):
        # register models have no CLS row (no_embed_class); others neither patches only nor CLS + patches
        patches = pos.shape[1] - ("register_tokens" not in out)
        raise rectangular_grid_error(f"pos_embed holds {patches} patch positions, which is no square grid")
    fc1, fc2 = out.get("blocks.0.mlp.fc1.weight"), out.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
        out = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in out.items()}
    return out


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n
