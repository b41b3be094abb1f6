"""Cosine similarity of one patch (chosen by pixel coordinates) to every patch of an image; the
pixel <-> patch conversions for an image seen whole (resized, not cropped)."""

import numpy as np


def pixel_to_patch(x: float, y: float, image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of the patch under pixel (x, y) of an image of `image_size` (height, width) whose
    resized copy (whole image, no crop) the model saw as a `grid` (h, w) of patches."""
    height, width = image_size
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"pixel ({x}, {y}) is outside the {width}x{height} image (x is the column, y the row)")
    return min(int(y / height * grid[0]), grid[0] - 1), min(int(x / width * grid[1]), grid[1] - 1)


def patch_to_pixel(row, col, image_size: tuple[int, int], grid: tuple[int, int]):
    """(x, y) pixel of the centre of patch (row, col) of a `grid` (h, w) on an image of `image_size`
    (height, width): the inverse of `pixel_to_patch` (whose patch it falls in). Takes arrays too."""
    height, width = image_size
    return (np.asarray(col) + 0.5) * width / grid[1], (np.asarray(row) + 0.5) * height / grid[0]


def patch_similarity(source: np.ndarray, patch: tuple[int, int], target: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity (h_t, w_t) of patch (row, col) of `source` (h, w, D) patch features to every
    patch of `target` (h_t, w_t, D; default: the source itself)."""
    target = source if target is None else target
    query = source[patch]
    query = query / np.linalg.norm(query)
    flat = target.reshape(-1, target.shape[-1])
    cos = flat @ query / np.maximum(np.linalg.norm(flat, axis=1), 1e-12)
    return cos.reshape(target.shape[:2])
