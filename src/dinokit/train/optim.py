"""Optimiser set-up of self-distillation: lr scaling, AdamW parameter groups, gradient clipping.

Parameter groups follow `dinov2/utils/param_groups.py`: backbone parameters get the layer-wise lr
multiplier decay^(L + 1 - layer) with layer 0 for the embeddings (patch_embed, pos_embed, cls_token,
register_tokens, mask_token), i + 1 for `blocks.i` and L + 1 for the final norm; `patch_embed` is
further multiplied by `patch_embed_lr_mult`; head parameters get 1. Weight decay is off for biases,
norms and LayerScale gammas (names ending in `.bias` or containing `norm` or `gamma`), and with
`no_decay_tokens` for the EMBEDDINGS' tokens and position embeddings too (the fine-tuning recipes of
BEiT / MAE / timm; `patch_embed`'s projection keeps it). Parameters
with equal (lr multiplier, wd multiplier, is last layer, is backbone) share one AdamW group.
"""

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

from dinokit.errors import DinokitError

LR_SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "none")
EMBEDDINGS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def scale_lr(base_lr: float, global_batch_size: int, rule: str = "sqrt_wrt_1024") -> float:
    """sqrt_wrt_1024 (DINOv2): base * sqrt(G / 1024); linear_wrt_256 (DINO v1): base * G / 256; none."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch_size / 1024)
    if rule == "linear_wrt_256":
        return base_lr * global_batch_size / 256
    if rule == "none":
        return base_lr
    raise DinokitError(f"lr_scaling must be one of {', '.join(LR_SCALING_RULES)}, got {rule!r}")


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a backbone parameter: 0 embeddings, i + 1 for blocks.i, num_layers + 1 otherwise."""
    if name.split(".")[0] in EMBEDDINGS:
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def no_weight_decay(name: str) -> bool:
    """Biases, norms and LayerScale gammas; `name` relative to its module (a bare nn.Linear head's "bias")."""
    return name == "bias" or name.endswith(".bias") or "norm" in name or "gamma" in name


def param_groups(
    backbone: nn.Module,
    heads: dict[str, nn.Module],
    layerwise_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    no_decay_tokens: bool = False,
) -> list[dict]:
    """AdamW groups with keys params, lr_multiplier, wd_multiplier, is_last_layer, is_backbone, names."""
    num_layers = len(backbone.blocks)
    entries = []
    for name, p in backbone.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = layerwise_decay ** (num_layers + 1 - layer_id(name, num_layers))
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        token = no_decay_tokens and name.split(".")[0] in EMBEDDINGS and not name.startswith("patch_embed")
        wd = 0.0 if no_weight_decay(name) or token else 1.0
        entries.append((f"backbone.{name}", p, lr_mult, wd, False, True))
    for head_name, head in heads.items():
        for name, p in head.named_parameters():
            if not p.requires_grad:
                continue
            wd = 0.0 if no_weight_decay(name) else 1.0
            entries.append((f"{head_name}.{name}", p, 1.0, wd, "last_layer" in name, False))
    groups: dict[tuple, dict] = {}
    for full_name, p, lr_mult, wd_mult, last, is_backbone in entries:
        key = (lr_mult, wd_mult, last, is_backbone)
        group = groups.setdefault(
            key,
            dict(
                params=[],
                names=[],
                lr_multiplier=lr_mult,
                wd_multiplier=wd_mult,
                is_last_layer=last,
                is_backbone=is_backbone,
            ),
        )
        group["params"].append(p)
        group["names"].append(full_name)
    return list(groups.values())


def build_optimizer(groups: list[dict], betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the groups (lr and weight decay are set every iteration by `apply_schedule`).

    The fused implementation on CPU and CUDA, where PyTorch has one: one kernel per group instead of
    foreach's one per operation (about ten); on the 2-core CPU the ViT-S/14 recipe's step (44M
    parameters, 31 groups) takes 76 instead of 86 ms (bench/cpu_training_speed.py).
    """
    device_types = {p.device.type for g in groups for p in g["params"]}
    fused = device_types <= {"cpu", "cuda"}
    return torch.optim.AdamW(
        groups, lr=0.0, weight_decay=0.0, betas=tuple(betas), fused=fused, foreach=None if fused else True
    )


def apply_schedule(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    """Set each group's lr and weight decay from the schedule values at this iteration."""
    for group in optimizer.param_groups:
        lr = values["last_layer_lr"] if group["is_last_layer"] else values["lr"]
        if group["is_backbone"]:
            lr *= values["backbone_lr_factor"]
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = values["weight_decay"] * group["wd_multiplier"]


def drop_last_layer_gradients(optimizer: torch.optim.Optimizer) -> None:
    """DINO v1's `cancel_gradients_last_layer`: the heads' last layers lose their gradients, so AdamW
    leaves them, their moments and their step count untouched this step (DINOv2 sets their lr to 0
    instead, and their moments keep moving)."""
    for group in optimizer.param_groups:
        if group["is_last_layer"]:
            for p in group["params"]:
                p.grad = None


def clip_gradients(modules: Iterable[nn.Module], max_norm: float, per: str = "module") -> torch.Tensor:
    """Clip gradient norms to `max_norm` (0: measure only): each module's norm separately (`per="module"`,
    as the official DINOv2 code does for the backbone and each head) or each parameter's own norm
    (`per="parameter"`, DINO v1's `utils.clip_gradients`: g <- g min(1, max_norm / (|g| + 1e-6))).
    Returns the total gradient norm before clipping, over all modules."""
    norms = []
    for module in modules:
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            continue
        for group in [[p] for p in params] if per == "parameter" else [params]:
            if max_norm > 0:
                norms.append(torch.nn.utils.clip_grad_norm_(group, max_norm, foreach=True))
            else:
                norms.append(torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True))
    if not norms:
        return torch.tensor(0.0)
    return torch.stack([n.float() for n in norms]).norm().cpu()  # one copy to the host, not one per norm
