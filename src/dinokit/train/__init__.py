"""Self-supervised pretraining (DINO, DINOv2): config and presets, schedules, optimiser, trainer."""

from dinokit.train.config import PretrainConfig, list_presets, resolve_config
from dinokit.train.pretrain import pretrain

__all__ = ["PretrainConfig", "list_presets", "pretrain", "resolve_config"]
