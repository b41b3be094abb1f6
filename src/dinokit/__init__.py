"""dinokit: DINO / DINOv2 self-supervised vision, from released weights to pretraining and features.

import dinokit
model = dinokit.load_model("dinov2_vits14")          # or any .pth / HF folder / timm / dinokit file
cls = model(images)                                   # (B, D) normed CLS
out = model.forward_features(images)                  # x_norm_clstoken, x_norm_patchtokens, ...
dinokit.pretrain(data="my_images/", out="out/run", preset="cpu32")  # DINO / DINOv2 pretraining
"""

from dinokit.errors import DinokitError
from dinokit.models import (
    ARCHITECTURES,
    VisionTransformer,
    ViTConfig,
    count_parameters,
    create_model,
    export_model,
    load_model,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "pretrain":  # imported on first use: it pulls in torchvision and the trainer
        from dinokit.train.pretrain import pretrain

        return pretrain
    raise AttributeError(f"module 'dinokit' has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES",
    "DinokitError",
    "ViTConfig",
    "VisionTransformer",
    "count_parameters",
    "create_model",
    "export_model",
    "load_model",
    "pretrain",
]
