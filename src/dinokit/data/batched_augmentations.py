"""Multi-crop augmentation of a whole batch at once, as tensor operations: the `augmentation=batched`
path for images small enough to keep in memory (CIFAR-size to ~100 px).

`MultiCropAugmentation` runs torchvision transforms one crop at a time: at 32 px that costs ~4 ms of
Python per image for 2 + 6 crops, 7.6x the batched path (`bench/cpu_training_speed.py`). `BatchedMultiCrop`
draws the same random parameters per crop (one generator, so a batch is reproducible) and applies
each transform to all crops together:

- RandomResizedCrop: boxes drawn as torchvision draws them (area fraction ~ U(scale), log aspect ratio
  ~ U(log 3/4, log 4/3), 10 tries, then the central crop), cut and resized by
  `torchvision.ops.roi_align` (bilinear, averaging 2 x 2 samples per output pixel when shrinking)
  instead of bicubic resizing; horizontal flip with p 0.5.
- Colour jitter with p `color_jitter_probability`: brightness, contrast, saturation and hue factors
  drawn per crop as torchvision's ColorJitter draws them, applied in a random order per crop, with
  torchvision's formulas (blend with black / the mean gray / the gray image; hue rotated in HSV).
- Grayscale (ITU-R 601 luma, as torchvision), Gaussian blur (per-crop sigma, kernel `blur_kernel_size`
  or +-3 sigma of the largest sigma), solarisation of the second and later global crops.

Input: uint8 (B, 3, H, W). Output: uint8 crops, crop-major as `MultiCropCollate` stacks them.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from dinokit.data.augmentations import DINOV2_SCALES, resolve_blur

LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def bernoulli(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool, True with probability p."""
    return torch.rand(n, generator=generator) < p


def random_resized_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float],
    generator: torch.Generator,
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    tries: int = 10,
) -> torch.Tensor:
    """(n, 4) float boxes (x0, y0, x1, y1) in pixels, drawn as torchvision's RandomResizedCrop
    draws (top, left, h, w): the first of `tries` (area, aspect ratio) draws that fits the image,
    otherwise the central crop with the aspect ratio clamped to `ratio`. Integer corners."""
    area = height * width
    target = area * uniform(n * tries, scale[0], scale[1], generator).view(n, tries)
    log_ratio = uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), generator).view(n, tries)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), torch.full((n,), -1))
    rows = torch.arange(n)
    w, h = w[rows, first.clamp(min=0)], h[rows, first.clamp(min=0)]
    # fallback: the central crop of the clamped aspect ratio (torchvision's rule)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    missed = first < 0
    w = torch.where(missed, torch.tensor(float(fw)), w)
    h = torch.where(missed, torch.tensor(float(fh)), h)
    top = torch.floor(torch.rand(n, generator=generator) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=generator) * (width - w + 1))
    top = torch.where(missed, torch.floor((height - h) / 2), top)
    left = torch.where(missed, torch.floor((width - w) / 2), left)
    return torch.stack([left, top, left + w, top + h], dim=1)


def resized_crops(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """float (n, 3, size, size): box i of images[image_index[i]] (float (B, 3, H, W)), bilinearly
    resampled; each output pixel averages ceil(box side / size) x ceil(...) samples (antialiasing)."""
    rois = torch.cat([image_index.to(boxes.dtype)[:, None], boxes], dim=1)
    sampling = max(1, math.ceil(float((boxes[:, 2:] - boxes[:, :2]).max()) / size))
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=sampling, aligned=True)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) luma of float RGB (n, 3, H, W)."""
    r, g, b = x.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1]; factor (n,)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0.0, 1.0)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """float RGB in [0, 1] (n, 3, H, W) -> HSV, hue in [0, 1)."""
    r, g, b = x.unbind(dim=1)
    value, _ = x.max(dim=1)
    low, _ = x.min(dim=1)
    chroma = value - low
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), torch.zeros_like(value))
    c = chroma.clamp(min=1e-12)
    hue = torch.where(value == r, ((g - b) / c) % 6.0, torch.where(value == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue)) % 1.0
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """HSV (hue in [0, 1)) -> float RGB (n, 3, H, W): each channel value - value * saturation *
    clamp(min(k, 4 - k), 0, 1) with k = (n + 6 hue) mod 6 for n = 5, 3, 1."""
    hue, saturation, value = x.unbind(dim=1)
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = (offset + 6.0 * hue) % 6.0
        channels.append(value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Hue rotated by factor (n,) in [-0.5, 0.5] turns, as torchvision's adjust_hue."""
    hsv = rgb_to_hsv(x)
    hue = (hsv[:, 0] + factor.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1)).clamp(0.0, 1.0)


def color_jitter(x: torch.Tensor, strength: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue) = `strength`, drawn per crop:
    factors ~ U(max(0, 1 - s), 1 + s) (hue ~ U(-s, s)), the four applied in a random order per crop."""
    n = len(x)
    brightness, contrast, saturation, hue = (float(s) for s in strength)
    factors = [
        uniform(n, max(0.0, 1 - brightness), 1 + brightness, generator),
        uniform(n, max(0.0, 1 - contrast), 1 + contrast, generator),
        uniform(n, max(0.0, 1 - saturation), 1 + saturation, generator),
        uniform(n, -hue, hue, generator),
    ]
    order = torch.rand(n, 4, generator=generator).argsort(dim=1)  # a random permutation per crop
    enabled = [brightness > 0, contrast > 0, saturation > 0, hue > 0]
    for position in range(4):
        for op in range(4):
            chosen = (order[:, position] == op).nonzero().squeeze(1)
            if not enabled[op] or len(chosen) == 0:
                continue
            part, f = x[chosen], factors[op][chosen]
            if op == 0:
                part = blend(part, torch.zeros_like(part), f)
            elif op == 1:
                part = blend(part, grayscale(part).mean(dim=(1, 2, 3), keepdim=True), f)
            elif op == 2:
                part = blend(part, grayscale(part), f)
            else:
                part = adjust_hue(part, f)
            x = x.index_copy(0, chosen, part)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Each crop blurred with its own sigma (n,) in pixels, separable kernel of `kernel_size` (odd),
    reflect padding, as torchvision's gaussian_blur."""
    n, c, h, w = x.shape
    radius = kernel_size // 2
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t[None, :] / sigma[:, None].to(x.dtype)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n * c, k)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


class BatchedMultiCrop:
    """uint8 images (B, 3, H, W) -> (global crops uint8 (n_g * B, 3, G, G), local crops uint8
    (n_l * B, 3, L, L) or None), crop-major; the parameters and their meaning are those of
    `MultiCropAugmentation`."""

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
    ) -> None:
        self.global_crops_size, self.local_crops_size = global_crops_size, local_crops_size
        self.global_crops_number, self.local_crops_number = global_crops_number, local_crops_number
        self.global_crops_scale, self.local_crops_scale = tuple(global_crops_scale), tuple(local_crops_scale)
        self.blur_probabilities = resolve_blur(blur_probabilities, blur_as_released)
        self.blur_sigma = tuple(blur_sigma)
        self.blur_kernel_size = blur_kernel_size
        self.solarize_probability = solarize_probability
        self.color_jitter = tuple(color_jitter)
        self.color_jitter_probability = color_jitter_probability
        self.grayscale_probability = grayscale_probability

    def __repr__(self) -> str:
        return (
            f"BatchedMultiCrop(global {self.global_crops_number} x {self.global_crops_size} px scale "
            f"{self.global_crops_scale}, local {self.local_crops_number} x {self.local_crops_size} px scale "
            f"{self.local_crops_scale}, colour jitter {self.color_jitter} p {self.color_jitter_probability}, "
            f"grayscale p {self.grayscale_probability}, blur p {self.blur_probabilities} sigma {self.blur_sigma} "
            f"kernel {self.blur_kernel_size or '3 sigma'}, solarize p {self.solarize_probability})"
        )

    def crops(
        self, images: torch.Tensor, number: int, size: int, scale: Sequence[float], generator: torch.Generator
    ) -> torch.Tensor:
        """float (number * B, 3, size, size) in [0, 1]: geometry and colour, before blur."""
        b, _, h, w = images.shape
        n = number * b
        image_index = torch.arange(b).repeat(number)  # crop-major
        boxes = random_resized_boxes(n, h, w, scale, generator)
        x = resized_crops(images, image_index, boxes, size)
        flip = bernoulli(n, 0.5, generator)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        jitter = bernoulli(n, self.color_jitter_probability, generator).nonzero().squeeze(1)
        if len(jitter):
            x = x.index_copy(0, jitter, color_jitter(x[jitter], self.color_jitter, generator))
        gray = bernoulli(n, self.grayscale_probability, generator).view(-1, 1, 1, 1)
        return torch.where(gray, grayscale(x).expand_as(x), x)

    def blur(self, x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        chosen = bernoulli(len(x), p, generator).nonzero().squeeze(1)
        if p <= 0 or len(chosen) == 0:
            return x
        sigma = uniform(len(chosen), *self.blur_sigma, generator)
        size = self.blur_kernel_size or 2 * math.ceil(3 * self.blur_sigma[1]) + 1
        size = min(size, 2 * (min(x.shape[-2:]) - 1) + 1)  # reflect padding needs radius < side
        return x.index_copy(0, chosen, gaussian_blur(x[chosen], sigma, size))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = len(images)
        x = images.float() / 255.0
        blur_first, blur_other, blur_local = self.blur_probabilities
        n_global, n_local = self.global_crops_number, self.local_crops_number
        global_crops = self.crops(x, n_global, self.global_crops_size, self.global_crops_scale, generator)
        first, other = global_crops[:b], global_crops[b:]
        first = self.blur(first, blur_first, generator)
        if len(other):
            other = self.blur(other, blur_other, generator)
            solarize = bernoulli(len(other), self.solarize_probability, generator).view(-1, 1, 1, 1)
            to_uint8 = (other * 255.0).round()
            other = torch.where(solarize & (to_uint8 >= 128), 255.0 - to_uint8, to_uint8) / 255.0
        global_crops = torch.cat([first, other])
        local_crops = None
        if n_local:
            local_crops = self.crops(x, n_local, self.local_crops_size, self.local_crops_scale, generator)
            local_crops = self.blur(local_crops, blur_local, generator)
            local_crops = to_uint8_image(local_crops)
        return to_uint8_image(global_crops), local_crops


def to_uint8_image(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)
