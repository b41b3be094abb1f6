"""Unlabelled images for pretraining: multi-crop items and an infinite, resumable sample stream.

The stream is the concatenation of one random permutation of the dataset per pass (epoch), seeded by
(seed, pass). Global batch i is stream positions [i * G, (i + 1) * G) for a global batch of G images;
process r of W takes the r-th slice of it. A position therefore names the same image and the same
augmentation whatever the number of processes or data-loader workers, and resuming means restarting
the stream at the number of images already seen.
"""

from pathlib import Path

import numpy as np
import torch

from dinokit.data.images import open_rgb


def mixed_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers, e.g. (seed, purpose, position)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class MultiCropDataset(torch.utils.data.Dataset):
    """dataset[(index, position)] -> (crops, index, position), or (None, index, position) for a file
    that cannot be decoded (corrupt, truncated, empty, not an image): it is dropped by the collate and
    counted by the trainer, never a crash. Images go through `dinokit.data.images.open_rgb` (EXIF
    orientation, any mode -> RGB); images smaller than a crop are upsampled by RandomResizedCrop.

    The augmentation's random draws come from a generator seeded by (seed, position), so they do not
    depend on which worker processes the item or on the process's own RNG.
    """

    def __init__(self, paths: list[Path], transform, seed: int = 0) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        index, position = key
        try:
            image = open_rgb(self.paths[index])
        except Exception:  # unreadable file: skipped and counted
            return None, index, position
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mixed_seed(self.seed, 0, position))
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
            self._order = torch.randperm(self.num_images, generator=generator).tolist()
            self._pass = epoch
        return self._order[offset]

    def __iter__(self):
        position = self.start + self.rank * self.batch_size
        step = self.batch_size * self.world_size
        while True:
            yield [(self.index_at(p), p) for p in range(position, position + self.batch_size)]
            position += step
