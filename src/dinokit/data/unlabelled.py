"""Unlabelled images for pretraining: multi-crop items (or, with augmentation=batched, whole batches
cropped from images held in memory) and an infinite, resumable sample stream.

The stream is the concatenation of one random permutation of the dataset per pass (epoch), seeded by
(seed, pass). Global batch i is stream positions [i * G, (i + 1) * G) for a global batch of G images;
process r of W takes the r-th slice of it. A position therefore names the same image and the same
augmentation whatever the number of processes or data-loader workers, and resuming means restarting
the stream at the number of images already seen.
"""

import os
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2
from tqdm import tqdm

from dinokit.data.batched_augmentations import BatchedMultiCrop
from dinokit.data.collate import CropBatch, MultiCropCollate
from dinokit.data.images import ImageFiles, ReducedJpegDecode, collate_skipping_bad, decode_min_side, open_rgb
from dinokit.errors import DinokitError


def mixed_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers, e.g. (seed, purpose, position)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class MultiCropDataset(torch.utils.data.Dataset):
    """dataset[(index, position)] -> (crops, index, position), or (None, index, position) for a file
    that cannot be decoded (corrupt, truncated, empty, not an image): it is dropped by the collate and
    counted by the trainer, never a crash. Images go through `dinokit.data.images.open_rgb` (EXIF
    orientation, any mode -> RGB); images smaller than a crop are upsampled by RandomResizedCrop.

    The augmentation's random draws come from a generator seeded by (seed, position), so they do not
    depend on which worker processes the item or on the process's own RNG. Large JPEGs are decoded at
    the reduced scale the transform allows (`decode_min_side`: ReducedJpegDecode, crops_min_side).
    """

    def __init__(self, paths: list[Path], transform, seed: int = 0) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.seed = seed
        self.min_side = decode_min_side(transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        index, position = key
        try:
            image = open_rgb(self.paths[index], self.min_side)
        except Exception:  # unreadable file: skipped and counted
            return None, index, position
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue seeds for every accelerator
            torch.default_generator.manual_seed(mixed_seed(self.seed, 0, position))
            return self.transform(image), index, position


class StreamBatchSampler:
    """Infinite batch sampler over the sample stream (module docstring): yields lists of
    (index, position) of length `batch_size` for process `rank`, starting at stream position `start`
    (the number of images every process together has consumed)."""

    def __init__(
        self, num_images: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0
    ) -> None:
        if num_images < 1:
            raise ValueError("the dataset is empty")
        self.num_images = num_images
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start = start
        self._pass = -1
        self._order = None

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_images)
        if epoch != self._pass:
            generator = torch.Generator().manual_seed(mixed_seed(self.seed, 1, epoch))
            # a tensor, not a list: 8 bytes an image instead of a Python int's 36 (5 GB for 142M images)
            self._order = torch.randperm(self.num_images, generator=generator)
            self._pass = epoch
        return int(self._order[offset])

    def __iter__(self):
        position = self.start + self.rank * self.batch_size
        step = self.batch_size * self.world_size
        while True:
            yield [(self.index_at(p), p) for p in range(position, position + self.batch_size)]
            position += step


# ------------------------------------------------------------------------- augmentation=batched
def decode_to_memory(
    paths: list[Path], size: int, num_workers: int = 0, progress: bool = False, reduced_decode: bool = True
) -> tuple[torch.Tensor, list[int]]:
    """Every image decoded once: (uint8 (N, 3, size, size), indices of unreadable files, whose rows
    stay zero). Shorter side resized to `size` (bicubic, antialiased), then the central square; large
    JPEGs decoded at a reduced scale that keeps twice `size` (`ReducedJpegDecode`) if `reduced_decode`.
    Refused when the copies of every process on this machine (torchrun's LOCAL_WORLD_SIZE) would
    take more than half of its memory."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = len(paths) * 3 * size * size * processes
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available // 2:
        copies = f" ({processes} processes on this machine, a copy each)" if processes > 1 else ""
        raise DinokitError(
            f"augmentation=batched keeps the data in memory: {len(paths)} images at {size} px need "
            f"{needed / 2**30:.1f} GiB{copies}, more than half of this machine's {available / 2**30:.1f} GiB. "
            "Use augmentation=per_image, or a smaller batched_image_size."
        )
    bicubic = v2.InterpolationMode.BICUBIC
    steps = [v2.ToImage(), v2.Resize(size, bicubic, antialias=True), v2.CenterCrop(size)]
    transform = v2.Compose([ReducedJpegDecode(2 * size), *steps] if reduced_decode else steps)
    loader = torch.utils.data.DataLoader(
        ImageFiles(list(paths), transform), batch_size=256, num_workers=num_workers, collate_fn=collate_skipping_bad
    )
    images = torch.zeros(len(paths), 3, size, size, dtype=torch.uint8)
    bad: list[int] = []
    for batch, good, bad_batch in tqdm(loader, desc="decoding", unit="batch", disable=not progress, leave=False):
        if batch is not None:
            images[good] = batch
        bad += bad_batch
    return images, bad


class InMemoryMultiCrops:
    """The `augmentation=batched` counterpart of `MultiCropDataset` + DataLoader: `batches(sampler)`
    iterates `CropBatch`es over the sample stream, cropping whole batches of the in-memory images
    (`decode_to_memory`) with `BatchedMultiCrop`. A batch's random draws come from a generator seeded
    by (seed, stream position of its first image) and its iBOT masks from `collate.ibot_masks`, so a
    resumed run sees the same batches."""

    def __init__(
        self,
        images: torch.Tensor,
        bad: list[int],
        augmentation: BatchedMultiCrop,
        collate: MultiCropCollate,
        seed: int = 0,
    ) -> None:
        self.images, self.bad = images, set(bad)
        self.augmentation, self.collate, self.seed = augmentation, collate, seed

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, sampler: StreamBatchSampler):
        for items in sampler:
            first_position = items[0][1]
            good = [index for index, _ in items if index not in self.bad]
            bad = [index for index, _ in items if index in self.bad]
            if not good:
                yield CropBatch.empty(bad)
                continue
            generator = torch.Generator().manual_seed(mixed_seed(self.seed, 0, first_position))
            global_crops, local_crops = self.augmentation(self.images[good], generator)
            masks, weights = self.collate.ibot_masks(len(global_crops), first_position)
            yield CropBatch(global_crops, local_crops, masks, weights, torch.tensor(good), bad)
