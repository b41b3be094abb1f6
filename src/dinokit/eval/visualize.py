"""PNG pictures of dense predictions: class maps in a fixed palette, depth through a colormap, and
side-by-side panels (image | ground truth | prediction)."""

from pathlib import Path

import numpy as np
from PIL import Image

from dinokit.io import atomic_write


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: 0 (background) black, then well-separated hues (tab20)."""
    from matplotlib import colormaps

    colours = (colormaps["tab20"](np.arange(20))[:, :3] * 255).astype(np.uint8)
    out = np.zeros((max(num_classes, 1), 3), dtype=np.uint8)
    for c in range(1, num_classes):
        out[c] = colours[(c - 1) % 20]
    return out


def colour_mask(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8; ignored and out-of-range pixels white."""
    pal = np.vstack([palette(num_classes), [[255, 255, 255]]]).astype(np.uint8)
    index = np.where((mask >= 0) & (mask < num_classes) & (mask != ignore_index), mask, num_classes)
    return pal[index]


def colour_depth(depth: np.ndarray, min_depth: float, max_depth: float, valid: np.ndarray | None = None) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8 via the 'magma_r' colormap (near = bright); invalid pixels black."""
    from matplotlib import colormaps

    t = np.clip((depth - min_depth) / max(max_depth - min_depth, 1e-9), 0, 1)
    rgb = (colormaps["magma_r"](t)[..., :3] * 255).astype(np.uint8)
    if valid is not None:
        rgb[~valid] = 0
    return rgb


def save_panel(path: Path, tiles: list[np.ndarray], gap: int = 4) -> None:
    """Save (H, W, 3) uint8 tiles side by side (resized to the first tile's height) as one PNG."""
    height = tiles[0].shape[0]
    resized = []
    for tile in tiles:
        im = Image.fromarray(tile)
        if im.height != height:
            im = im.resize((round(im.width * height / im.height), height), Image.NEAREST)
        resized.append(np.asarray(im.convert("RGB")))
    width = sum(t.shape[1] for t in resized) + gap * (len(resized) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for tile in resized:
        canvas[:, x : x + tile.shape[1]] = tile
        x += tile.shape[1] + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(canvas).save(tmp, format="PNG"))
