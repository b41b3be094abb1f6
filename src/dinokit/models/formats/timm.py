"""timm layout of `vit_*_patch14_dinov2` and `vit_*_patch14_reg4_dinov2`.

timm keeps the official names except: no mask token (restored as zeros for DINOv2); register models
are `no_embed_class` (the CLS position embedding is folded into `cls_token` and `pos_embed` covers
patches only; registers are `reg_token`); ViT-g's SwiGLU is `mlp.fc1` / `mlp.fc2` (packed, act(x1) * x2
as the official w12 / w3).
"""

import torch


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
    loads strictly and timm recognises a DINOv2 file by it, so an official export must hold it."""
    out = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}
    if has_layer_scale(out) and "mask_token" not in out and "cls_token" in out:
        cls = out["cls_token"]
        out["mask_token"] = torch.zeros(1, cls.shape[-1], dtype=cls.dtype)
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
    pos = out.get("pos_embed")
    if pos is not None and int(pos.shape[1] ** 0.5) ** 2 == pos.shape[1]:
        out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    fc1, fc2 = out.get("blocks.0.mlp.fc1.weight"), out.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
        out = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in out.items()}
    return out
