"""Distillation of a smaller model from a frozen, trained one: the DINOv2 paper's section 5.

"We leverage the same training loop with a few exceptions: we use a larger model as a frozen
teacher, keep a spare EMA of the student that we use as our final model, remove the masking and
stochastic depth, and apply the iBOT loss on the two global crops." (The official repository has no
distillation code; its released ViT-S/B/L were distilled from ViT-g this way.) Here:

    teacher   the teacher (backbone and heads) of a finished `dinokit pretrain` run, frozen;
    student   a fresh backbone (or init=) of any width and depth, with fresh heads of the teacher's
              sizes, trained with the teacher run's objective against the frozen teacher's targets;
    no masking: the student sees whole global crops and iBOT compares every patch of them, so the
              two backbones must share their patch size;
    no stochastic depth (drop_path_rate 0);
    final model: the run's EMA of the student (the EMA teacher slot of self-distillation), exported
              as backbone.safetensors.

The frozen teacher needs its heads, which released backbones (official .pth, HF, timm) do not ship:
train heads for one first with `dinokit pretrain init=<released> freeze_backbone=1.0 ...` (the head
warm-up on a frozen backbone), then distil from that run folder.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dinokit.errors import DinokitError
from dinokit.losses import DINOHead
from dinokit.models.loading import load_model
from dinokit.models.vision_transformer import VisionTransformer, ViTConfig
from dinokit.train.checkpoint import list_checkpoints, load_checkpoint
from dinokit.train.config import PretrainConfig
from dinokit.train.self_distillation import Student

# the student's objective and heads are the teacher's (its targets live in the teacher's prototype space)
TEACHER_KEYS = (
    "objective",
    "head_prototypes",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "head_nlayers",
    "head_norm_last_layer",
    "ibot_separate_head",
    "ibot_prototypes",
    "ibot_hidden_dim",
    "ibot_bottleneck_dim",
    "ibot_loss_weight",
)
SET_BY_DISTILLATION = (*TEACHER_KEYS, "drop_path_rate")  # what `distillation_config` replaces


@dataclass
class TeacherRun:
    """What a finished run leaves for distillation: its settings and its teacher's weights."""

    source: Path  # the checkpoint read
    config: dict  # the run's PretrainConfig as a dict
    backbone_config: dict | None  # ViTConfig.to_dict() of its backbone (None: a checkpoint from before 2026-11-27)
    state: dict[str, torch.Tensor]  # the checkpoint's model state (teacher.*, *_center.*)


def teacher_checkpoint(source: str | Path) -> Path:
    """The newest checkpoint of a run folder, or `source` itself when it is a checkpoint file."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = list_checkpoints(path / "checkpoints")
        if not found:
            raise DinokitError(
                f"distill_from={source} holds no checkpoints/ (a `dinokit pretrain` run folder keeps its teacher "
                "there; run with checkpoint_every=... or let the run end, which saves one)"
            )
        return found[-1]
    if path.is_file() and path.suffix == ".pt":
        return path
    if path.exists():
        raise DinokitError(
            f"distill_from={source} is not a dinokit pretraining run: distillation needs the teacher's heads, "
            "which a backbone file has none of. Train heads for it first: `dinokit pretrain init=<its weights> "
            "freeze_backbone=1.0 ...` (the backbone frozen), then distil from that run folder"
        )
    raise DinokitError(f"distill_from={source} not found (a `dinokit pretrain` run folder or one of its checkpoints)")


def read_teacher_run(source: str | Path) -> TeacherRun:
    path = teacher_checkpoint(source)
    checkpoint = load_checkpoint(path)
    missing = [k for k in ("config", "model") if k not in checkpoint]
    if missing:
        raise DinokitError(f"{path} is not a dinokit pretraining checkpoint (no {', '.join(missing)})")
    return TeacherRun(path, checkpoint["config"], checkpoint.get("backbone_config"), checkpoint["model"])


def distillation_config(cfg: PretrainConfig, teacher: TeacherRun) -> tuple[PretrainConfig, list[str]]:
    """`cfg` with the teacher run's objective and head sizes and no stochastic depth; and a note per
    value that changed."""
    values = {key: teacher.config[key] for key in TEACHER_KEYS if key in teacher.config}
    values["drop_path_rate"] = 0.0
    notes = [f"{k}={getattr(cfg, k)!r} -> {v!r}" for k, v in values.items() if getattr(cfg, k) != v]
    return replace(cfg, **values), notes


def frozen_teacher(teacher: TeacherRun, cfg: PretrainConfig) -> Student:
    """The teacher run's teacher (backbone + heads) as a frozen module in eval mode."""
    if teacher.backbone_config is not None:
        backbone = VisionTransformer(replace(ViTConfig(**teacher.backbone_config), drop_path_rate=0.0))
    else:  # the architecture from the weights, as load_model reads a training checkpoint
        config = load_model(teacher.source).config
        backbone = VisionTransformer(replace(config, mask_token="teacher.backbone.mask_token" in teacher.state))
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


def teacher_centers(teacher: TeacherRun) -> dict[str, torch.Tensor]:
    """The teacher run's EMA centers ({"dino_center.center": (1, K), ...}): where a frozen teacher's
    EMA centering starts."""
    return {k: v for k, v in teacher.state.items() if k.endswith("_center.center")}
