"""Cosine similarity of one patch (chosen by pixel coordinates) to every patch of an image."""

import numpy as np


def pixel_to_patch(x: float, y: float, image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of the patch under pixel (x, y) of an image of `image_size` (height, width) whose
    resized copy (whole image, no crop) the model saw as a `grid` (h, w) of patches."""
    height, width = image_size
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"pixel ({x}, {y}) is outside the {width}x{height} image (x is the column, y the row)")
    return min(int(y / height * grid[0]), grid[0] - 1), min(int(x / width * grid[1]), grid[1] - 1)


def patch_similarity(source: np.ndarray, patch: tuple[int, int], target: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity (h_t, w_t) of patch (row, col) of `source` (h, w, D) patch features to every
    patch of `target` (h_t, w_t, D; default: the source itself)."""
    target = source if target is None else target
    query = source[patch]
    query = query / np.linalg.norm(query)
    flat = target.reshape(-1, target.shape[-1])
    cos = flat @ query / np.maximum(np.linalg.norm(flat, axis=1), 1e-12)
    return cos.reshape(target.shape[:2])
