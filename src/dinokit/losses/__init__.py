"""Heads and losses of DINO / DINOv2 self-distillation, one concept per file."""

from dinokit.losses.centering import EMACenter
from dinokit.losses.dino_head import DINOHead
from dinokit.losses.dino_loss import DINOLoss
from dinokit.losses.ibot_loss import IBOTPatchLoss
from dinokit.losses.koleo_loss import KoLeoLoss
from dinokit.losses.sinkhorn_knopp import sinkhorn_knopp

__all__ = ["DINOHead", "DINOLoss", "EMACenter", "IBOTPatchLoss", "KoLeoLoss", "sinkhorn_knopp"]
