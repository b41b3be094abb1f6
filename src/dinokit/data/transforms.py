"""Evaluation / feature-extraction transforms (torchvision transforms v2).

The official eval transform is Resize(256, bicubic) -> CenterCrop(224) -> ImageNet normalisation.
`eval_transform(image_size, resize_policy)` offers three policies (all bicubic with antialiasing):

- "center_crop" (default): keep the aspect ratio, scale the image to cover image_size * 256/224, crop
  the center image_size. At a square size this is exactly the official transform; at a non-square
  (height, width) the image covers the whole box (no padding).
- "resize": resize to exactly image_size (height, width), stretching if needed; keeps the borders a
  center crop drops (the maintainers' advice for retrieval, dinov2 #326).
- "aspect": keep the aspect ratio: short side -> image_size, long side -> the nearest multiple of the
  patch size (so the shape follows each image: one image at a time, e.g. the visual tools).

Sizes given to the model must be multiples of the patch size; `check_image_size` says so early.
Each policy starts with `ReducedJpegDecode` (`reduced_decode=False` leaves it out): large JPEGs opened
by `ImageFiles` decode at a reduced scale that keeps twice the resize's size.
"""

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from dinokit.data.images import ReducedJpegDecode, exif_orientation, to_rgb, upright
from dinokit.errors import DinokitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize() -> v2.Compose:
    """PIL image or uint8 tensor -> float tensor in ImageNet-normalised units."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ResizeToCover(torch.nn.Module):
    """Keep the aspect ratio and resize so that the image covers (height, width): the side that needs
    the larger scale gets exactly its target, the other follows (rounded down as torchvision does, so
    a square target gives `v2.Resize(short_side)` exactly)."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        self.height, self.width = height, width

    def forward(self, image):
        h, w = v2.functional.get_size(image)
        if self.height / h >= self.width / w:
            size = [self.height, max(int(self.height * w / h), self.width)]
        else:
            size = [max(int(self.width * h / w), self.height), self.width]
        return v2.functional.resize(image, size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)

    def __repr__(self) -> str:
        return f"ResizeToCover(height={self.height}, width={self.width}, bicubic, antialias)"


class ResizeKeepAspect(torch.nn.Module):
    """Short side -> `short_side`, long side -> the multiple of `patch_size` nearest to the aspect-kept
    length (at least one patch): the whole image, in a shape the model accepts."""

    def __init__(self, short_side: int, patch_size: int) -> None:
        super().__init__()
        self.short_side, self.patch_size = short_side, patch_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        long = max(p, round(self.short_side * max(height, width) / min(height, width) / p) * p)
        return (self.short_side, long) if height <= width else (long, self.short_side)

    def forward(self, image):
        size = list(self.output_size(*v2.functional.get_size(image)))
        return v2.functional.resize(image, size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)

    def __repr__(self) -> str:
        return f"ResizeKeepAspect(short_side={self.short_side}, patch_size={self.patch_size}, bicubic, antialias)"


RESIZE_POLICIES = ("center_crop", "resize", "aspect")


class EvalTransform(v2.Compose):
    """eval_transform's steps, given the RGB image they expect: a numpy (H, W) or (H, W, 3 | 4) uint8
    array (photo arrays; torchvision's v2 steps would pass it through unresized and uncropped) becomes a
    PIL image, and a PIL image is turned by its EXIF orientation (`Image.open` of a phone photo is not)
    and one of another mode ("L", "RGBA", "P", 16-bit) converted to RGB by `to_rgb`, as `open_rgb` does
    to the files it opens (upright, alpha on white, 16 bits rescaled). Tensors pass
    as they are. The steps, and `describe`, are Compose's."""

    def forward(self, image):
        if isinstance(image, np.ndarray):
            if (
                image.dtype != np.uint8
                or image.ndim not in (2, 3)
                or (image.ndim == 3 and image.shape[2] not in (3, 4))
            ):
                raise DinokitError(
                    f"the transform takes a numpy photo as a uint8 (H, W) or (H, W, 3) array, got {image.dtype} "
                    f"{image.shape}: convert it (e.g. (array * 255).round().astype(np.uint8) for values in 0..1), "
                    "or pass a PIL image"
                )
            image = Image.fromarray(image)
        if isinstance(image, Image.Image):
            image = upright(image) if exif_orientation(image) != 1 else image  # no copy of an upright one
            image = to_rgb(image) if image.mode != "RGB" else image
        return super().forward(image)


def eval_transform(
    image_size: int | tuple[int, int] = 224,
    resize_policy: str = "center_crop",
    patch_size: int = 14,
    reduced_decode: bool = True,
) -> v2.Compose:
    """PIL image (any mode), numpy (H, W, 3) uint8 array or uint8 tensor (3, H, W) / (B, 3, H, W) ->
    normalised float tensor (3, H, W) / (B, 3, H, W) under one of RESIZE_POLICIES (module docstring).
    image_size: an int (square) or (height, width); for 'aspect' an int, the short side.
    reduced_decode: start with `ReducedJpegDecode` at twice the resize's largest side, so that files
    opened by `ImageFiles` (every eval and embed command) decode large JPEGs at a reduced scale; False
    decodes them whole, as the official evaluation does."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    bicubic = v2.InterpolationMode.BICUBIC
    if resize_policy == "center_crop":
        cover_h, cover_w = round(h * 256 / 224), round(w * 256 / 224)
        # square: the official Resize(short side); ResizeToCover does the same there, and more
        cover = v2.Resize(cover_h, bicubic, antialias=True) if h == w else ResizeToCover(cover_h, cover_w)
        steps, resized = [cover, v2.CenterCrop((h, w)), normalize()], max(cover_h, cover_w)
    elif resize_policy == "resize":
        steps, resized = [v2.Resize((h, w), interpolation=bicubic, antialias=True), normalize()], max(h, w)
    elif resize_policy == "aspect":
        if h != w:
            raise DinokitError("resize_policy='aspect' takes one image_size (the short side), not (height, width)")
        steps, resized = [ResizeKeepAspect(h, patch_size), normalize()], h
    else:
        raise DinokitError(f"resize_policy must be one of {', '.join(RESIZE_POLICIES)}, got {resize_policy!r}")
    return EvalTransform([ReducedJpegDecode(2 * resized), *steps] if reduced_decode else steps)


def check_image_size(
    image_size: int | tuple[int, int] | list[int], patch_size: int, name: str = "image_size"
) -> tuple[int, int]:
    """(height, width) from an int or a pair; a DinokitError naming the nearest valid sizes if a side is
    not a positive multiple of the patch size. `name`: the key the size was given as."""
    sides = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(sides) != 2:
        raise DinokitError(f"{name} must be one size or [height, width], got {list(sides)}")
    h, w = sides
    for side in (h, w):
        if side < patch_size:
            raise DinokitError(
                f"{name} {side} must be at least the patch size {patch_size}, and a multiple of it; "
                f"use {patch_size} or more"
            )
        if side % patch_size:
            lower, upper = side // patch_size * patch_size, -(-side // patch_size) * patch_size
            raise DinokitError(
                f"{name} {side} is not a multiple of the patch size {patch_size}; use {lower} or {upper}"
            )
    return h, w


def check_model_input_size(model, image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """`check_image_size` for `model` (a VisionTransformer), printing a note (once under torchrun) where
    the size makes over 4x the patches of the model's own position grid: a model trained on small crops
    (e.g. a 16 px cpu32 run) fed the default 224 px is slow, and its features usually worse."""
    from dinokit.distributed import launched_as_process_0

    h, w = check_image_size(image_size, model.patch_size)
    own = model.config.img_size // model.patch_size
    grid = (h // model.patch_size, w // model.patch_size)
    if grid[0] * grid[1] > 4 * own * own and launched_as_process_0():
        print(
            f"note: image_size={image_size} makes a {grid[0]}x{grid[1]} patch grid, {grid[0] * grid[1] / own**2:.0f}x "
            f"the model's own {own}x{own} (img_size {model.config.img_size}): far from the size it was trained at "
            "its features are slower and usually worse; pass image_size near that size (e.g. 32 for CIFAR-10)"
        )
    return h, w


def describe(transform: v2.Compose) -> str:
    """One-line description of a transform, printed with results so that they can be reproduced."""
    return " -> ".join(" ".join(repr(t).split()) for t in transform.transforms)
