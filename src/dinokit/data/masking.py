"""Block-wise masking for iBOT (BEiT-style, as `dinov2/data/masking.py`), one image at a time.

Blocks are rectangles of patches with a random area and aspect ratio, added until the target count
is reached. The 10 tries per block are drawn and checked at once with an integral image, so one mask
costs a handful of small NumPy calls instead of the official per-patch Python loops.
"""

import math

import numpy as np


class MaskingGenerator:
    """`gen(num_masking_patches, rng)` -> bool mask (height, width) with at most that many patches set.

    One block: area ~ U(min_num_patches, max_new), aspect = exp(U(log min_aspect, log max_aspect)),
    h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); the block must fit strictly
    (h < height, w < width) and add between 1 and max_new new patches, where max_new =
    min(remaining, max_num_patches). The first of `attempts` tries that qualifies is applied; the mask
    is complete when the target is reached or a block finds no valid try.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        attempts: int = 10,
    ) -> None:
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches // 2 if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.attempts = attempts

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        return mask

    def _add_block(self, mask: np.ndarray, max_new: int, rng: np.random.Generator) -> int:
        n = self.attempts
        low, high = self.min_num_patches, max_new  # high < low is allowed, as Python's random.uniform
        area = low + (high - low) * rng.random(n)
        aspect = np.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * rng.random(n))
        h = np.round(np.sqrt(area * aspect)).astype(np.int64)
        w = np.round(np.sqrt(area / aspect)).astype(np.int64)
        fits = (h < self.height) & (w < self.width) & (h > 0) & (w > 0)
        if not fits.any():
            return 0
        h, w = np.where(fits, h, 0), np.where(fits, w, 0)  # tries that do not fit stay out of bounds checks
        top = (rng.random(n) * (self.height - h + 1)).astype(np.int64)
        left = (rng.random(n) * (self.width - w + 1)).astype(np.int64)
        # integral image: masked count of any rectangle in O(1)
        integral = np.zeros((self.height + 1, self.width + 1), dtype=np.int64)
        integral[1:, 1:] = mask.cumsum(0).cumsum(1)
        bottom, right = top + h, left + w
        already = integral[bottom, right] - integral[top, right] - integral[bottom, left] + integral[top, left]
        new = h * w - already
        ok = fits & (new > 0) & (new <= max_new)
        if not ok.any():
            return 0
        i = int(np.argmax(ok))
        mask[top[i] : bottom[i], left[i] : right[i]] = True
        return int(new[i])
