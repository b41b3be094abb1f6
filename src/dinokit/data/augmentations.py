"""Multi-crop augmentation of DINO / DINOv2 (`dinov2/data/augmentations.py`), with torchvision
transforms v2.

Every crop: RandomResizedCrop (bicubic) + horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1) with
p 0.8, grayscale with p 0.2. Then Gaussian blur with p 1.0 on the first global crop, 0.1 on the
second (which is also solarised with p 0.2) and 0.5 on the local crops: the intended values (DINO v1,
BYOL). The official DINOv2 / DINOv3 code inverts them by mistake (its blur passes 1 - p to
RandomApply), so the released checkpoints were trained with 0.0 / 0.9 / 0.5: `blur_as_released=True`
reproduces that. The blur is torchvision's GaussianBlur with a fixed kernel (DINOv2: 9 pixels), or
with `blur_kernel_size=0` PIL's untruncated Gaussian (DINO v1's blur, and ~30x faster on small
crops). Crops come out as uint8 tensors; `CropBatch.to` normalises the batch.
"""

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from dinokit.data.images import crops_min_side

# (global crops scale, local crops scale) of the two recipes.
DINOV2_SCALES = ((0.32, 1.0), (0.05, 0.32))  # ssl_default_config.yaml
DINO_SCALES = ((0.4, 1.0), (0.05, 0.4))  # dino:main_dino.py


def resolve_blur(probabilities: Sequence[float], as_released: bool) -> tuple[float, float, float]:
    """The blur probabilities (first global, other globals, locals) actually applied: with
    `as_released`, 1 - p each, as the official GaussianBlur(p) applies with probability 1 - p."""
    first, other, local = (float(p) for p in probabilities)
    return (1.0 - first, 1.0 - other, 1.0 - local) if as_released else (first, other, local)


class GaussianBlurPIL(v2.Transform):
    """Gaussian blur with sigma ~ U(sigma_min, sigma_max) pixels and no kernel truncation: PIL's
    ImageFilter.GaussianBlur (DINO v1) for PIL images, a +-3 sigma kernel for tensors."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)) -> None:
        super().__init__()
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def make_params(self, flat_inputs: list) -> dict:
        return {"sigma": float(torch.empty(1).uniform_(*self.sigma))}

    def transform(self, inpt, params: dict):
        sigma = params["sigma"]
        if isinstance(inpt, Image.Image):
            return inpt.filter(ImageFilter.GaussianBlur(sigma))
        size = 2 * math.ceil(3 * sigma) + 1
        return v2.functional.gaussian_blur(inpt, [size, size], [sigma, sigma])

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


class MultiCropAugmentation:
    """PIL image -> {"global_crops": [uint8 (3, G, G)] * n_global, "local_crops": [uint8 (3, L, L)] * n_local}.

    `blur_probabilities` = (first global crop, other global crops, local crops). The second and later
    global crops are solarised (threshold 128) with `solarize_probability`. `blur_sigma` is in pixels of
    the crop; `blur_kernel_size` > 0 uses torchvision's GaussianBlur with that kernel, 0 `GaussianBlurPIL`.
    `reduced_decode`: `decode_min_side` is the short side large JPEGs may be decoded at (`crops_min_side`),
    which the pretraining dataset applies when it opens a file; else None.
    """

    def __init__(
        self,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        global_crops_number: int = 2,
        local_crops_number: int = 8,
        global_crops_scale: Sequence[float] = DINOV2_SCALES[0],
        local_crops_scale: Sequence[float] = DINOV2_SCALES[1],
        blur_probabilities: Sequence[float] = (1.0, 0.1, 0.5),
        blur_as_released: bool = False,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        blur_kernel_size: int = 9,
        solarize_probability: float = 0.2,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_probability: float = 0.8,
        grayscale_probability: float = 0.2,
        reduced_decode: bool = False,
    ) -> None:
        crops = [(global_crops_size, global_crops_scale)] + [(local_crops_size, local_crops_scale)] * (
            local_crops_number > 0
        )
        # the short side large JPEGs may be decoded at (MultiCropDataset): no crop is ever upsampled
        self.decode_min_side = crops_min_side(crops) if reduced_decode else None
        self.blur_probabilities = blur_first, blur_other, blur_local = resolve_blur(
            blur_probabilities, blur_as_released
        )
        self.global_crops_number = global_crops_number
        self.local_crops_number = local_crops_number
        bicubic = v2.InterpolationMode.BICUBIC

        def geometric(size: int, scale: Sequence[float]) -> list:
            return [
                v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic, antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
            ]

        colour = [
            v2.RandomApply([v2.ColorJitter(*color_jitter)], p=color_jitter_probability),
            v2.RandomGrayscale(p=grayscale_probability),
        ]

        def blur(p: float, size: int) -> list:
            if p <= 0:
                return []
            if blur_kernel_size > 0:  # reflect padding needs radius < side (as the batched path)
                kernel = min(blur_kernel_size, 2 * (size - 1) + 1)
                return [v2.RandomApply([v2.GaussianBlur(kernel, sigma=tuple(blur_sigma))], p=p)]
            return [v2.RandomApply([GaussianBlurPIL(blur_sigma)], p=p)]

        to_uint8 = [v2.ToImage(), v2.ToDtype(torch.uint8, scale=True)]
        solarize = [v2.RandomSolarize(threshold=128, p=solarize_probability)] if solarize_probability > 0 else []
        self.global_first = v2.Compose(
            geometric(global_crops_size, global_crops_scale) + colour + blur(blur_first, global_crops_size) + to_uint8
        )
        self.global_other = v2.Compose(
            geometric(global_crops_size, global_crops_scale)
            + colour
            + blur(blur_other, global_crops_size)
            + to_uint8
            + solarize
        )
        self.local = v2.Compose(
            geometric(local_crops_size, local_crops_scale) + colour + blur(blur_local, local_crops_size) + to_uint8
        )

    def __call__(self, image: Image.Image) -> dict[str, list[torch.Tensor]]:
        global_crops = [self.global_first(image)] + [
            self.global_other(image) for _ in range(self.global_crops_number - 1)
        ]
        local_crops = [self.local(image) for _ in range(self.local_crops_number)]
        return {"global_crops": global_crops, "local_crops": local_crops}

    def __repr__(self) -> str:
        parts = [
            f"global 1: {self.global_first}",
            f"global 2+: {self.global_other}",
            f"local x{self.local_crops_number}: {self.local}",
        ]
        if self.decode_min_side:
            parts.insert(0, f"ReducedJpegDecode(min_side={self.decode_min_side})")
        return "MultiCropAugmentation(\n  " + "\n  ".join(p.replace("\n", " ") for p in parts) + "\n)"
