"""Evaluation / feature-extraction transforms (torchvision transforms v2).

The official eval transform is Resize(256, bicubic) -> CenterCrop(224) -> ImageNet normalisation;
`eval_transform(size)` is its analogue at any size (resize to size * 256/224, crop size).
`resize_policy="resize"` instead resizes the whole image to exactly size (or (height, width)), keeping
the borders that a center crop drops.
"""

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize() -> v2.Compose:
    """PIL image or uint8 tensor -> float tensor in ImageNet-normalised units."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(image_size: int | tuple[int, int] = 224, resize_policy: str = "center_crop") -> v2.Compose:
    """resize_policy 'center_crop': keep aspect, resize the short side to size*256/224, center crop
    `image_size` (the official eval transform at 224). 'resize': resize to `image_size` exactly."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    bicubic = v2.InterpolationMode.BICUBIC
    if resize_policy == "center_crop":
        resize = v2.Resize(round(min(h, w) * 256 / 224), interpolation=bicubic, antialias=True)
        return v2.Compose([resize, v2.CenterCrop((h, w)), normalize()])
    if resize_policy == "resize":
        return v2.Compose([v2.Resize((h, w), interpolation=bicubic, antialias=True), normalize()])
    raise ValueError(f"resize_policy must be 'center_crop' or 'resize', got {resize_policy!r}")


def describe(transform: v2.Compose) -> str:
    """One-line description of a transform, printed with results so that they can be reproduced."""
    return " -> ".join(" ".join(repr(t).split()) for t in transform.transforms)
