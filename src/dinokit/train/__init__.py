"""Self-supervised pretraining (DINO, DINOv2): config and presets, schedules, optimiser, trainer.

The trainer is `dinokit.pretrain` (module `dinokit.train.pretrain`); it is not imported here, so that
the config (and `dinokit finetune`, `dinokit pretrain --help`) loads without the training stack.
"""

from dinokit.train.config import PretrainConfig, list_presets, resolve_config

__all__ = ["PretrainConfig", "list_presets", "resolve_config"]
