"""Batching multi-crop samples: crop-major stacking, batched normalisation and iBOT masks."""

from dataclasses import dataclass

import numpy as np
import torch

from dinokit.data.masking import MaskingGenerator
from dinokit.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class CropBatch:
    """One training batch of n_g global and n_l local crops of B images, stacked crop-major
    ([crop 0 of every image, crop 1 of every image, ...], as the official collate).

    global_crops (n_g * B, 3, G, G) and local_crops (n_l * B, 3, L, L) are uint8 (4x less to move
    between processes); `to(device)` moves them and normalises them there, in float32;
    masks (n_g * B, N) bool over the global crops' patches (None without iBOT); mask_weights (M,)
    = 1/|M_i| for each of the M masked patches, in `masks.nonzero()` order; indices (B,) dataset
    indices of the images; bad (list) indices of files that could not be read (dropped).
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor | None
    masks: torch.Tensor | None
    mask_weights: torch.Tensor | None
    indices: torch.Tensor
    bad: list[int]

    @classmethod
    def empty(cls, bad: list[int]) -> "CropBatch":
        """A batch whose files were all unreadable (indices `bad`): the trainer skips it."""
        return cls(torch.empty(0), None, None, None, torch.empty(0, dtype=torch.long), bad)

    @property
    def batch_size(self) -> int:
        return len(self.indices)

    def pin_memory(self) -> "CropBatch":
        pin = [t.pin_memory() if t is not None else None for t in (self.global_crops, self.local_crops, self.masks)]
        return CropBatch(*pin, self.mask_weights, self.indices, self.bad)

    def to(self, device: torch.device) -> "CropBatch":
        """On `device`, crops normalised with the ImageNet mean and std (float32)."""
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0)

        def normalise(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            return (x.to(device, non_blocking=True).float() - mean) * inv_std

        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return x.to(device, non_blocking=True) if x is not None else None

        return CropBatch(
            normalise(self.global_crops),
            normalise(self.local_crops),
            move(self.masks),
            move(self.mask_weights),
            self.indices,
            self.bad,
        )


def stratified_masks(
    num_images: int,
    generator: MaskingGenerator,
    rng: np.random.Generator,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
    sample_probability: float = 0.5,
) -> torch.Tensor:
    """(num_images, N) bool. int(num_images * sample_probability) images get masks whose target
    ratios are stratified: image i of them targets int(N * U(r_i, r_{i+1})) patches with
    r = linspace(min, max, n_masked + 1); the others get none; the order is then shuffled
    (`dinov2/data/collate.py`)."""
    n = generator.num_patches
    n_masked = int(num_images * sample_probability)
    ratios = np.linspace(*ratio_min_max, n_masked + 1)
    masks = np.zeros((num_images, n), dtype=bool)
    for i in range(n_masked):
        target = int(n * rng.uniform(ratios[i], ratios[i + 1]))
        masks[i] = generator(target, rng).reshape(-1)
    return torch.from_numpy(masks[rng.permutation(num_images)])


class MultiCropCollate:
    """Collate for `MultiCropDataset` items ({"global_crops": [uint8 (3,G,G)], "local_crops": [...]},
    index, stream position); bad items (None) are dropped and reported.

    Crops stay uint8; `CropBatch.to(device)` normalises the whole batch at once on the training
    device, several times cheaper than per crop. With a `mask_generator`, iBOT masks are drawn from an RNG seeded by
    (seed, stream position of the batch's first image), so they do not depend on the worker.
    """

    def __init__(
        self,
        mask_generator: MaskingGenerator | None = None,
        ratio_min_max: tuple[float, float] = (0.1, 0.5),
        sample_probability: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.mask_generator = mask_generator
        self.ratio_min_max = tuple(ratio_min_max)
        self.sample_probability = sample_probability
        self.seed = seed

    def ibot_masks(self, num_crops: int, first_position: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(masks (num_crops, N) bool, weights (M,)) for a batch whose first image is at stream
        position `first_position`; (None, None) without a mask generator."""
        if self.mask_generator is None:
            return None, None
        rng = np.random.default_rng([self.seed, 7919, first_position])
        masks = stratified_masks(num_crops, self.mask_generator, rng, self.ratio_min_max, self.sample_probability)
        per_image = masks.sum(dim=1, keepdim=True).clamp(min=1)
        return masks, (1.0 / per_image).expand_as(masks)[masks]

    def __call__(self, items: list) -> CropBatch:
        good = [(crops, index, position) for crops, index, position in items if crops is not None]
        bad = [index for crops, index, _ in items if crops is None]
        if not good:
            return CropBatch.empty(bad)
        n_global = len(good[0][0]["global_crops"])
        n_local = len(good[0][0]["local_crops"])
        global_crops = torch.stack([c["global_crops"][i] for i in range(n_global) for c, _, _ in good])
        local_crops = (
            torch.stack([c["local_crops"][i] for i in range(n_local) for c, _, _ in good]) if n_local else None
        )
        masks, weights = self.ibot_masks(len(global_crops), int(good[0][2]))
        indices = torch.tensor([index for _, index, _ in good])
        return CropBatch(global_crops, local_crops, masks, weights, indices, bad)
