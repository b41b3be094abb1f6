"""The checks curation's inputs share: vectors that are directions (unit rows for cosine similarity),
counts that are whole numbers, and vectors that fit on the device the work runs on."""

import numpy as np
import torch

from dinokit.errors import DinokitError
from dinokit.retrieval.index import normalise

UNIT = 1e-6  # rows whose squared norm is within this of 1 are taken as they are (float32 normalised rows are)


def unit_rows(vectors, name: str, allow_empty: bool = False) -> np.ndarray:
    """vectors (N, D) as L2-normalised contiguous float32 rows (directions: cosine = inner product), or a
    DinokitError naming the rows that have none: NaN or inf, zeros, or too large for float32. `name`
    names the array in the message; allow_empty accepts N = 0. Rows normalised already (squared norms
    within UNIT of 1) come back as they are, `vectors` itself if it is a contiguous float32 array: do
    not write to the result."""
    try:
        v = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DinokitError(f"{name} must be a numeric array of shape (rows, dimension): {e}") from None
    if v.ndim != 2 or v.shape[1] < 1 or (len(v) < 1 and not allow_empty):
        rows = "" if allow_empty else " with at least one row"
        raise DinokitError(f"{name} must be a 2-D array of shape (rows, dimension){rows}, got shape {v.shape}")
    bad = np.flatnonzero(~np.isfinite(v).all(axis=1))
    if len(bad):
        raise DinokitError(
            f"{name} has {len(bad)} row(s) with NaN or infinite values (the first is row {bad[0]}): "
            "remove them or embed those images again"
        )
    squared = np.einsum("ij,ij->i", v, v, dtype=np.float64)
    bad = np.flatnonzero(squared > np.finfo(np.float32).max)
    if len(bad):  # faiss.normalize_L2 would turn them into zeros (an overflowing float32 squared norm)
        raise DinokitError(
            f"{name} has {len(bad)} row(s) too large to normalise in float32 (the first is row {bad[0]}): "
            "divide the vectors by a common scale first"
        )
    if v.flags.c_contiguous and np.abs(squared - 1).max(initial=0) <= UNIT:
        return v  # normalised already (a curation command's vectors): no second N x D array
    v = normalise(v)
    bad = np.flatnonzero(np.abs(np.einsum("ij,ij->i", v, v) - 1) > 1e-3)
    if len(bad):
        raise DinokitError(
            f"{name} has {len(bad)} row(s) of zeros or too small to normalise (the first is row {bad[0]}): "
            "a cosine needs a direction; remove them or embed those images again"
        )
    return v


def whole_number(value, name: str, low: int = 0) -> int:
    """value as an int if it is a whole number >= low (an int or numpy integer, not a bool), else a
    DinokitError naming it: counts are never truncated from floats."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise DinokitError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(value)


def on_device(x: np.ndarray, device: torch.device, name: str = "the vectors") -> torch.Tensor:
    """x as a tensor on `device` (the same memory on the CPU). Curation works on x whole there: on a GPU
    whose free memory x exceeds, a DinokitError naming the fix instead of CUDA's out-of-memory traceback."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if x.nbytes > free:
            raise DinokitError(
                f"{name} ({x.nbytes / 2**30:.1f} GiB, {len(x)} x {x.shape[1]} float32) do not fit in the free "
                f"memory of {device} ({free / 2**30:.1f} GiB): pass device=cpu, or curate fewer images at a time"
            )
    return torch.from_numpy(x).to(device)
