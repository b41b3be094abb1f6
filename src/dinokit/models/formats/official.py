"""The official DINOv2 / DINO layout: backbone `.pth` files and training checkpoints.

Also where a ViTConfig is inferred from the keys and shapes of an official-layout state dict.
"""

import math
import re
import warnings

import torch

from dinokit.errors import DinokitError
from dinokit.models.architectures import ARCHITECTURES, mlp_ratio_for_width
from dinokit.models.formats.hf import is_hf_key
from dinokit.models.layers.ffn import swiglu_hidden_dim
from dinokit.models.vision_transformer import ViTConfig, rectangular_grid_error

# Nested dicts that hold the backbone in training files: `teacher_checkpoint.pth` = {"teacher": ...},
# DINO v1 `checkpoint.pth` = {"student", "teacher", ...}, generic {"model"} / {"state_dict"}. The
# released backbones are teachers, so the teacher wins.
_CONTAINER_KEYS = ("teacher", "model", "state_dict", "student", "model_ema")
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "teacher.", "student.", "encoder.")
_HEAD_PREFIXES = (
    "dino_head.",
    "ibot_head.",
    "head.",
    "heads.",
    "fc_norm.",
    "dino_loss.",
    "ibot_patch_loss.",
    "dino_center.",  # dinokit's own checkpoints (train.self_distillation): the loss centers
    "ibot_center.",
)


def unwrap_training_checkpoint(obj: dict) -> dict[str, torch.Tensor]:
    """Backbone state dict out of a training checkpoint: pick the teacher (or model) dict, keep the
    teacher's keys where one dict holds `teacher.` and `student.` keys, strip the `module.` /
    `backbone.` / `teacher.` prefixes, drop head and loss keys, flatten block chunks
    (`blocks.<chunk>.<i>.` -> `blocks.<i>.`). Keys of a Hugging Face model are left whole once their
    wrapper prefixes are gone (HF's own `encoder.layer.` is no training prefix)."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise DinokitError(f"no state dict found in checkpoint (top-level keys: {sorted(obj)[:10]})")
        obj = inner
    if isinstance(obj, dict) and "teacher" in obj and isinstance(obj["teacher"], dict):
        obj = obj["teacher"]
    has_teacher = any(_role(key) == "teacher" for key in obj)
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor) or (has_teacher and _role(key) == "student"):
            continue
        key = _strip_prefixes(key)
        if key.startswith(_HEAD_PREFIXES):
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)] = value
    return out


def _strip_prefixes(key: str) -> str:
    """`key` without its training / wrapper prefixes (`module.backbone.` ...), one at a time, stopping
    at a Hugging Face key (whose own `encoder.layer.` is no such prefix)."""
    while not is_hf_key(key):
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            break
        key = key[len(prefix) :]
    return key


def _role(key) -> str | None:
    """The role of a `[module.]teacher.` / `[module.]student.` key (the DINOv2 training
    `model` dict holds both): "teacher", "student" or None."""
    if not isinstance(key, str):
        return None
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return next((role for role in ("teacher", "student") if key.startswith(f"{role}.")), None)


def infer_config(
    sd: dict[str, torch.Tensor],
    num_heads: int | None = None,
    interpolate_offset: float | None = None,
    interpolate_antialias: bool | None = None,
) -> ViTConfig:
    """Architecture of an official-layout state dict, from whichever of its keys and shapes exist.

    A file that lacks some keys still gets a config (defaults: patch 14, grid 37, MLP ratio 4), so
    that `loading.check_keys` can list what is missing against the nearest known architecture.
    The number of heads and the position-grid interpolation are not stored in the weights: unless
    given, they are taken from the named architecture (`ARCHITECTURES`) with the same width, depth,
    patch, registers and FFN (any position grid). Without one they are guessed, with a warning: 64-dim heads (as
    every released model, `_guess_heads`), offset 0.1 without registers and offset 0 + antialias with them.
    """
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise DinokitError(
            f"not a ViT backbone state dict: it has no `blocks.{{i}}.` keys (first keys: {list(sd)[:8]})"
        )
    dim = _embed_dim(sd)
    proj = sd.get("patch_embed.proj.weight")
    patch, in_chans = (proj.shape[-1], proj.shape[1]) if proj is not None else (14, 3)
    pos = sd.get("pos_embed")
    grid = math.isqrt(pos.shape[1] - 1) if pos is not None else 37
    if pos is not None and grid * grid != pos.shape[1] - 1:
        raise rectangular_grid_error(f"pos_embed holds {pos.shape[1] - 1} patch positions, which is no square grid")
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    ffn, mlp_ratio, ffn_bias = _ffn(sd, dim)
    depth = 1 + max(blocks)
    given = dict(
        num_heads=num_heads, interpolate_offset=interpolate_offset, interpolate_antialias=interpolate_antialias
    )
    named = _named_settings(dim, depth, patch, registers, ffn)
    unset = [k for k, v in given.items() if v is None]
    if named is None:
        named = {  # 64-dim heads as every released model; the official interpolation of the variant
            "num_heads": _guess_heads(dim),
            "interpolate_offset": 0.0 if registers else 0.1,
            "interpolate_antialias": bool(registers),
        }
        if unset:
            warnings.warn(
                f"no named architecture has these weights' shape (dim {dim}, depth {depth}, patch {patch}, "
                f"{registers} registers, {ffn} FFN), and the weights do not store {', '.join(unset)}: "
                f"guessed {', '.join(f'{k}={named[k]}' for k in unset)}. If the model was built otherwise, "
                f"pass them: load_model(path, {', '.join(f'{k}=...' for k in unset)}).",
                stacklevel=3,
            )
    settings = {k: named[k] if v is None else v for k, v in given.items()}
    return ViTConfig(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=dim,
        depth=depth,
        num_heads=settings["num_heads"],
        mlp_ratio=mlp_ratio,
        ffn_layer=ffn,
        qkv_bias=_in_any_block(sd, "attn.qkv.bias"),
        proj_bias=_in_any_block(sd, "attn.proj.bias"),
        ffn_bias=ffn_bias,
        init_values=1.0 if _in_any_block(sd, "ls1.gamma") or _in_any_block(sd, "ls2.gamma") else None,
        num_register_tokens=registers,
        interpolate_offset=settings["interpolate_offset"],
        interpolate_antialias=settings["interpolate_antialias"],
        mask_token="mask_token" in sd,
    )


def _guess_heads(dim: int) -> int:
    """dim // 64 heads (64-dim heads, as every released model) where that divides dim, else the divisor of
    dim whose heads are nearest to 64 wide (224: 4 heads of 56, not 3, which would not divide it)."""
    heads = max(1, dim // 64)
    if dim % heads == 0:
        return heads
    return min((d for d in range(1, dim + 1) if dim % d == 0), key=lambda d: abs(dim / d - 64))


def _named_settings(dim: int, depth: int, patch: int, registers: int, ffn: str) -> dict | None:
    """num_heads / interpolate_offset / interpolate_antialias of the named architectures of this shape,
    or None if there is none (or they disagree). The position grid is not compared: pretraining sets it
    to the global crop size (a dinov2_vits14 trained at 224 px has a 16 x 16 grid, not 37 x 37)."""
    found = {
        (c.num_heads, c.interpolate_offset, c.interpolate_antialias)
        for c in ARCHITECTURES.values()
        if (c.embed_dim, c.depth, c.patch_size, c.num_register_tokens, c.ffn_layer)
        == (dim, depth, patch, registers, ffn)
    }
    if len(found) != 1:
        return None
    heads, offset, antialias = found.pop()
    return {"num_heads": heads, "interpolate_offset": offset, "interpolate_antialias": antialias}


def _block_keys(sd: dict[str, torch.Tensor], suffix: str) -> list[str]:
    """`blocks.{i}.<suffix>` keys of `sd`, lowest block first."""
    found = [k for k in sd if re.fullmatch(rf"blocks\.\d+\.{re.escape(suffix)}", k)]
    return sorted(found, key=lambda k: int(k.split(".")[1]))


def _in_any_block(sd: dict[str, torch.Tensor], suffix: str) -> bool:
    return bool(_block_keys(sd, suffix))


def _embed_dim(sd: dict[str, torch.Tensor]) -> int:
    """Width D from the first of cls_token, norm.weight, a block's norm1/norm2, pos_embed, patch_embed."""
    candidates = ["cls_token", "norm.weight", *_block_keys(sd, "norm1.weight"), *_block_keys(sd, "norm2.weight")]
    for key in candidates:
        if key in sd:
            return int(sd[key].shape[-1])
    if "pos_embed" in sd:
        return int(sd["pos_embed"].shape[-1])
    if "patch_embed.proj.weight" in sd:
        return int(sd["patch_embed.proj.weight"].shape[0])
    raise DinokitError(
        "not a ViT backbone state dict: it has blocks but none of cls_token, norm.weight, "
        f"blocks.{{i}}.norm1.weight, pos_embed, patch_embed.proj.weight (first keys: {list(sd)[:8]}). "
        "Pass the backbone's weights file."
    )


def _ffn(sd: dict[str, torch.Tensor], dim: int) -> tuple[str, float, bool]:
    """(ffn_layer, mlp_ratio, ffn_bias) from any block that has an FFN weight; MLP ratio 4 otherwise."""
    w12 = _block_keys(sd, "mlp.w12.weight")
    if w12:
        hidden = sd[w12[0]].shape[0] // 2
        if swiglu_hidden_dim(int(dim * 4.0)) != hidden:
            raise DinokitError(f"SwiGLU width {hidden} ({w12[0]}) does not follow the official rule for dim {dim}")
        return "swiglu", 4.0, _in_any_block(sd, "mlp.w12.bias") or _in_any_block(sd, "mlp.w3.bias")
    if _in_any_block(sd, "mlp.w3.weight"):
        return "swiglu", 4.0, _in_any_block(sd, "mlp.w3.bias")
    fc1, fc2 = _block_keys(sd, "mlp.fc1.weight"), _block_keys(sd, "mlp.fc2.weight")
    if fc1:
        ratio = mlp_ratio_for_width(sd[fc1[0]].shape[0], dim)
    elif fc2:
        ratio = mlp_ratio_for_width(sd[fc2[0]].shape[1], dim)
    else:
        ratio = 4.0
    return "mlp", ratio, _in_any_block(sd, "mlp.fc1.bias") or _in_any_block(sd, "mlp.fc2.bias")
