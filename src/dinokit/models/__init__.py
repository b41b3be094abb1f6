"""Vision Transformers of the DINO / DINOv2 family and their weights."""

from dinokit.models.architectures import ARCHITECTURES, count_parameters, create_model, get_config
from dinokit.models.loading import export_model, load_model
from dinokit.models.vision_transformer import VisionTransformer, ViTConfig, attention_to_patches, snap_to_patch_multiple

__all__ = [
    "ARCHITECTURES",
    "ViTConfig",
    "VisionTransformer",
    "attention_to_patches",
    "count_parameters",
    "create_model",
    "export_model",
    "get_config",
    "load_model",
    "snap_to_patch_multiple",
]
