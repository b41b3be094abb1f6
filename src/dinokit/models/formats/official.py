"""The official DINOv2 / DINO layout: backbone `.pth` files and training checkpoints.

Also where a ViTConfig is inferred from the keys and shapes of an official-layout state dict.
"""

import re

import torch

from dinokit.errors import DinokitError
from dinokit.models.layers.ffn import swiglu_hidden_dim
from dinokit.models.vision_transformer import ViTConfig

# Nested dicts that hold the backbone in training files: `teacher_checkpoint.pth` = {"teacher": ...},
# DINO v1 `checkpoint.pth` = {"student", "teacher", ...}, generic {"model"} / {"state_dict"}. The
# released backbones are teachers, so the teacher wins.
_CONTAINER_KEYS = ("teacher", "model", "state_dict", "student", "model_ema")
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "teacher.", "student.", "encoder.")
_HEAD_PREFIXES = ("dino_head.", "ibot_head.", "head.", "heads.", "fc_norm.", "dino_loss.", "ibot_patch_loss.")


def unwrap_training_checkpoint(obj: dict) -> dict[str, torch.Tensor]:
    """Backbone state dict out of a training checkpoint: pick the teacher (or model) dict, strip the
    `module.` / `backbone.` / `teacher.` prefixes, drop head and loss keys, flatten block chunks
    (`blocks.<chunk>.<i>.` -> `blocks.<i>.`)."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise DinokitError(f"no state dict found in checkpoint (top-level keys: {sorted(obj)[:10]})")
        obj = inner
    if isinstance(obj, dict) and "teacher" in obj and isinstance(obj["teacher"], dict):
        obj = obj["teacher"]
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        if key.startswith(_HEAD_PREFIXES):
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)] = value
    return out


def infer_config(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> ViTConfig:
    """Architecture of an official-layout state dict, from its keys and shapes.

    The number of heads is not stored in the weights; every released model has 64-dim heads, so
    num_heads = D / 64 unless given. Interpolation follows the official variants: offset 0.1 without
    registers, offset 0 + antialias with them.
    """
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in sd:
            raise DinokitError(f"not a ViT backbone state dict: key {key!r} is missing (first keys: {list(sd)[:8]})")
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise DinokitError("not a ViT backbone state dict: it has no `blocks.{i}.` keys")
    grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    if "blocks.0.mlp.w12.weight" in sd:
        ffn, hidden = "swiglu", sd["blocks.0.mlp.w12.weight"].shape[0] // 2
        mlp_ratio = 4.0
        if swiglu_hidden_dim(int(dim * mlp_ratio)) != hidden:
            raise DinokitError(f"SwiGLU width {hidden} does not follow the official rule for dim {dim}")
        ffn_bias = "blocks.0.mlp.w12.bias" in sd
    else:
        ffn, hidden = "mlp", sd["blocks.0.mlp.fc1.weight"].shape[0]
        mlp_ratio = hidden / dim
        ffn_bias = "blocks.0.mlp.fc1.bias" in sd
    return ViTConfig(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=sd["patch_embed.proj.weight"].shape[1],
        embed_dim=dim,
        depth=depth,
        num_heads=num_heads or max(1, dim // 64),
        mlp_ratio=mlp_ratio,
        ffn_layer=ffn,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        ffn_bias=ffn_bias,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,
        num_register_tokens=registers,
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=bool(registers),
        mask_token="mask_token" in sd,
    )
