"""Distillation of a smaller model from a frozen, trained one: the DINOv2 paper's section 5.

"We leverage the same training loop with a few exceptions: we use a larger model as a frozen
teacher, keep a spare EMA of the student that we use as our final model, remove the masking and
stochastic depth, and apply the iBOT loss on the two global crops." (The official repository has no
distillation code; its released ViT-S/B/L were distilled from ViT-g this way.) Here:

    teacher   the teacher (backbone and heads) of a finished `dinokit pretrain` run, frozen;
    student   a fresh backbone (or init=) of any width and depth, with fresh heads of the teacher's
              sizes, trained with the teacher run's objective against the frozen teacher's targets;
    no masking: the student sees whole global crops and iBOT compares every patch of them, so the
              two backbones must share their patch size (ibot_loss_weight=0 distils the CLS alone,
              for a student of another patch size);
    no stochastic depth (drop_path_rate 0);
    final model: the run's EMA of the student (the EMA teacher slot of self-distillation), exported
              as backbone.safetensors.

The frozen teacher needs its heads, which released backbones (official .pth, HF, timm) do not ship:
train heads for one first with `dinokit pretrain init=<released> freeze_backbone=1.0 ...` (the head
warm-up on a frozen backbone), then distil from that run folder.
"""

from dataclasses import replace
from pathlib import Path

import torch

from dinokit.errors import DinokitError
from dinokit.losses import DINOHead
from dinokit.models.vision_transformer import VisionTransformer
from dinokit.train.checkpoint import OBJECTIVE_KEYS, RunState, settings_from_run
from dinokit.train.config import PretrainConfig
from dinokit.train.self_distillation import Student

SET_BY_DISTILLATION = (*OBJECTIVE_KEYS, "drop_path_rate")  # what `distillation_config` replaces


def distillation_config(cfg: PretrainConfig, teacher: RunState) -> tuple[PretrainConfig, list[str]]:
    """`cfg` with the teacher run's objective and head sizes (the student learns in its teacher's
    prototype space) and no stochastic depth; and a note per value that changed. ibot_loss_weight=0
    is kept: the CLS alone is distilled (a student of another patch size than the teacher's)."""
    cls_only = {"ibot_loss_weight": 0.0} if cfg.ibot_loss_weight == 0 else {}
    return settings_from_run(cfg, teacher, drop_path_rate=0.0, **cls_only)


def teacher_checkpoint(distill_from: str, checkpoint: dict | None) -> str:
    """What a distilling run reads its teacher from: distill_from=, or (resumed) the checkpoint of that
    run it started from while it is still there, though the teacher run went on and saved newer ones."""
    pinned = Path((checkpoint or {}).get("distill_teacher_checkpoint") or "")
    given = Path(distill_from).expanduser().resolve()
    return str(pinned) if pinned.is_file() and given in (pinned, pinned.parent.parent) else distill_from


def frozen_teacher(teacher: RunState, cfg: PretrainConfig) -> Student:
    """The teacher run's teacher (backbone + heads) as a frozen module in eval mode."""
    backbone = VisionTransformer(replace(teacher.vit_config(), drop_path_rate=0.0))
    dim = backbone.embed_dim
    heads = (cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_nlayers, cfg.head_norm_last_layer)
    dino_head = DINOHead(dim, cfg.head_prototypes, *heads)
    ibot_head = None
    if any(k.startswith("teacher.ibot_head.") for k in teacher.state):  # a separate iBOT head
        ibot = (cfg.ibot_hidden_dim, cfg.ibot_bottleneck_dim, cfg.head_nlayers, cfg.head_norm_last_layer)
        ibot_head = DINOHead(dim, cfg.ibot_prototypes, *ibot)
    net = Student(backbone, dino_head, ibot_head)
    prefix = "teacher."
    state = {k[len(prefix) :]: v for k, v in teacher.state.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise DinokitError(f"the teacher in {teacher.source} does not match its own settings ({e})") from None
    return net.requires_grad_(False).eval()


def teacher_centers(teacher: RunState) -> dict[str, torch.Tensor]:
    """The teacher run's EMA centers ({"dino_center.center": (1, K), ...}): where a frozen teacher's
    EMA centering starts."""
    return {k: v for k, v in teacher.state.items() if k.endswith("_center.center")}


def every_patch(global_crops: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (n_g B, N) all True, weights (n_g B N,) = 1/N): iBOT's selection of every patch, each
    image weighted as one (distillation's iBOT on the whole global crops)."""
    h, w = (side // patch_size for side in global_crops.shape[-2:])
    masks = torch.ones(len(global_crops), h * w, dtype=torch.bool, device=global_crops.device)
    return masks, torch.full((masks.numel(),), 1.0 / (h * w), device=global_crops.device)
