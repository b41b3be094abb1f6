"""dinokit: DINO / DINOv2 self-supervised vision, from released weights to pretraining and features.

import dinokit
model = dinokit.load_model("dinov2_vits14")          # or any .pth / HF folder / timm / dinokit file
transform = dinokit.eval_transform(224)               # PIL image -> normalised (3, 224, 224) tensor
cls = model(images)                                   # (B, D) normed CLS
out = model.forward_features(images)                  # x_norm_clstoken, x_norm_patchtokens, ...
feats, kept, bad = dinokit.extract_features(model, paths, transform, which=["cls"])  # {kind: (N, ...)}
dinokit.pretrain(data="my_images/", out="out/run", preset="cpu32")  # DINO / DINOv2 pretraining
dinokit.finetune(model="out/run", train="data/train", val="data/val", out="out/ft", image_size=32)

docs/python.md shows every function of the Python API.
"""

import importlib
import importlib.util

from dinokit.errors import DinokitError

__version__ = "0.1.0"


# name -> module, imported on first use (torch, torchvision, faiss or the trainer): `import dinokit`,
# and so `dinokit --help`, loads none of them
LAZY = {
    "ARCHITECTURES": "dinokit.models.architectures",
    "ViTConfig": "dinokit.models.vision_transformer",
    "VisionTransformer": "dinokit.models.vision_transformer",
    "count_parameters": "dinokit.models.architectures",
    "create_model": "dinokit.models.architectures",
    "export_model": "dinokit.models.loading",
    "load_model": "dinokit.models.loading",
    "pretrain": "dinokit.train.pretrain",
    "finetune": "dinokit.train.finetune",
    "predict_classification": "dinokit.eval.classification",
    "load_released_depth_head": "dinokit.eval.released_depth",
    "load_released_segmentation_head": "dinokit.eval.released_segmentation",
    "eval_transform": "dinokit.data.transforms",
    "list_images": "dinokit.data.images",
    "extract_features": "dinokit.features.extract",
    "embed": "dinokit.features.embed",
    "read_embeddings": "dinokit.features.store",
    "attention_maps": "dinokit.maps.attention",
    "patch_features": "dinokit.maps.pca",
    "pca_rgb": "dinokit.maps.pca",
    "patch_similarity": "dinokit.maps.similarity",
    "segment_features": "dinokit.maps.segment",
    "match_patches": "dinokit.maps.matching",
    "best_match_similarity": "dinokit.maps.matching",
    "build_index": "dinokit.retrieval.commands",
    "search_index": "dinokit.retrieval.commands",
}


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    # a submodule on first use too, as when this file imported dinokit.models and dinokit.io at its top:
    # `import dinokit` then dinokit.models.snap_to_patch_multiple(...) (README), dinokit.io.atomic_write
    if not name.startswith("_") and importlib.util.find_spec(f"dinokit.{name}") is not None:
        return importlib.import_module(f"dinokit.{name}")
    raise AttributeError(f"module 'dinokit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *LAZY})


__all__ = ["DinokitError", *LAZY]
