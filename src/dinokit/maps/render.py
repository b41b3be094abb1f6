"""Turning patch maps into pictures: upsampling, colour maps, overlays, grids and PNG files.

Maps are numpy arrays (h, w) on the patch grid; images are uint8 RGB arrays (H, W, 3). Every PNG is
written atomically.
"""

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

from dinokit.io import atomic_write, shown

if TYPE_CHECKING:  # matplotlib is imported by the functions that draw: not for `--help`
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure


def upsample(patch_map: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """(h, w) or (C, h, w) patch map -> same at image size (H, W). 'bilinear' (smooth, values between
    patch centres interpolated) or 'nearest' (one flat block per patch, DINO's attention figures)."""
    t = torch.as_tensor(np.asarray(patch_map, dtype=np.float32))
    squeeze = t.ndim == 2
    t = t[None, None] if squeeze else t[None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(t, size=tuple(size), mode=mode, **kwargs)[0]
    return (out[0] if squeeze else out).numpy()


def shrink(image: np.ndarray, longest: int) -> np.ndarray:
    """An (H, W, 3) uint8 image resized (box filter) so that its long side is at most `longest`
    pixels, for drawing; a smaller one is returned as it is."""
    h, w = image.shape[:2]
    if max(h, w) <= longest:
        return image
    scale = longest / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def normalise_01(values: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (a constant array becomes zeros)."""
    values = np.asarray(values, dtype=np.float32)
    span = float(values.max() - values.min())
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def colorize(values: np.ndarray, cmap: str = "inferno", vmin: float | None = None, vmax: float | None = None):
    """(H, W) values -> (H, W, 3) uint8 through a matplotlib colour map (range: vmin..vmax or min..max)."""
    from matplotlib import colormaps

    values = np.asarray(values, dtype=np.float32)
    lo = values.min() if vmin is None else vmin
    hi = values.max() if vmax is None else vmax
    scaled = np.clip((values - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(values)
    return (colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heat_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an (H, W, 3) uint8 colour map over an (H, W, 3) uint8 image."""
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * heat_rgb.astype(np.float32)
    return mixed.round().clip(0, 255).astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 40, 40), alpha: float = 0.5) -> np.ndarray:
    """Tint the pixels where the bool (H, W) `mask` is set."""
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return out.round().astype(np.uint8)


def save_png(path: str | Path, array: np.ndarray) -> str:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return str(path)


def save_figure(path: str | Path, fig: "Figure") -> str:
    """Save a matplotlib figure as PNG (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return str(path)


def panel_figure(panels: list[tuple[str, np.ndarray]], columns: int, title: str = "", size: float = 2.6) -> "Figure":
    """A grid of titled images (uint8 RGB or 2-D arrays shown with a colour map); no pyplot state."""
    from matplotlib.figure import Figure

    rows = -(-len(panels) // columns)
    aspect = min(2.0, max(0.3, np.asarray(panels[0][1]).shape[0] / np.asarray(panels[0][1]).shape[1]))
    fig = Figure(figsize=(size * columns, (size * aspect + 0.3) * rows + (0.4 if title else 0)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax, (name, picture) in zip(axes, panels, strict=False):
        ax.imshow(picture, cmap="inferno" if np.asarray(picture).ndim == 2 else None)
        ax.set_title(shown(name), fontsize=8)  # a file name that is not UTF-8: matplotlib takes text only
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(shown(title), fontsize=9)
    return fig


def matches_figure(
    images: tuple[np.ndarray, np.ndarray],
    points: tuple[np.ndarray, np.ndarray],
    values: np.ndarray,
    below: list[tuple[str, np.ndarray]],
    title: str,
    below_bar: tuple[float, float, str] | None = None,
    cmap: str = "viridis",
) -> "Figure":
    """Two uint8 images side by side (the second scaled to the first's height) with a line from
    points[0][k] to points[1][k] ((N, 2) pixel (x, y) in each image) coloured by values[k] (colour
    bar: cosine similarity), above a row of titled images `below` (e.g. heat overlays); below_bar
    (lo, hi, label): the colour bar of the row below (`colorize`'s inferno from lo to hi)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    left, right = images
    scale = left.shape[0] / right.shape[0]
    right = np.asarray(Image.fromarray(right).resize((max(1, round(right.shape[1] * scale)), left.shape[0])))
    canvas = np.concatenate([left, right], axis=1)
    width = 8.0
    below_height = max(width / len(below) * p.shape[0] / p.shape[1] for _, p in below)
    top_height = width * canvas.shape[0] / canvas.shape[1]
    fig = Figure(figsize=(width, top_height + below_height + 0.8), layout="constrained")
    mosaic = [["pair"] * len(below), [f"below{k}" for k in range(len(below))]]
    axes = fig.subplot_mosaic(mosaic, height_ratios=[top_height, below_height])
    ax = axes["pair"]
    ax.imshow(canvas)
    values = np.asarray(values, dtype=np.float64)
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    norm = readable_norm(lo, hi)
    if len(values):
        start = np.asarray(points[0], dtype=np.float64)
        end = np.asarray(points[1], dtype=np.float64) * scale + [left.shape[1], 0]
        colours = colormaps[cmap](norm(values))
        ax.add_collection(LineCollection(np.stack([start, end], axis=1), colors=colours, linewidths=0.8))
        ax.scatter(*np.concatenate([start, end]).T, s=4, c=np.concatenate([colours, colours]))
    plain_ticks(fig.colorbar(ScalarMappable(norm, cmap), ax=ax, shrink=0.8, label="cosine similarity"))
    for k, (name, picture) in enumerate(below):
        axes[f"below{k}"].imshow(picture)
        axes[f"below{k}"].set_title(shown(name), fontsize=8)
    if below_bar is not None:
        lo, hi, label = below_bar
        row = [axes[f"below{k}"] for k in range(len(below))]
        plain_ticks(fig.colorbar(ScalarMappable(readable_norm(lo, hi), "inferno"), ax=row, shrink=0.8, label=label))
    for a in axes.values():
        a.axis("off")
    fig.suptitle(shown(title), fontsize=9)
    return fig


def readable_norm(lo: float, hi: float, span: float = 0.01) -> "Normalize":
    """A colour bar's range lo..hi, widened about its middle to at least `span`: a single value (one
    match) or values 1e-6 apart gave a bar of offset ticks ('1e-6+5.2558e-1') and colours that made
    equal cosines look different."""
    from matplotlib.colors import Normalize

    if hi - lo < span:
        middle = (lo + hi) / 2
        lo, hi = middle - span / 2, middle + span / 2
    return Normalize(lo, hi)


def plain_ticks(colorbar) -> None:
    """Tick labels as the values themselves, never as an offset ('1e-6+5.2558e-1') plus small numbers."""
    colorbar.formatter.set_useOffset(False)
    colorbar.update_ticks()


def thumbnail(path: str | Path, size: int) -> Image.Image:
    """A `size` x `size` letterboxed thumbnail of an image file (grey if it cannot be read)."""
    from dinokit.data.images import open_rgb

    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    try:
        image = open_rgb(path)
    except Exception:  # a moved or damaged file still gets its cell, marked grey
        return canvas
    image = ImageOps.contain(image, (size, size), Image.Resampling.BICUBIC)  # enlarges small images too
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas


def contact_sheet(
    rows: list[tuple[str, list[tuple[str, float | None]]]],
    path: str | Path,
    thumb: int = 128,
    first_labels: list[str] | None = None,
) -> str:
    """One row per query: the query image, then its hits with their scores. rows: [(query path,
    [(hit path, score or None), ...]), ...]. first_labels: the caption of each row's first image
    (default "query"). Writes a PNG; returns its path."""
    columns = 1 + max((len(hits) for _, hits in rows), default=0)
    caption = 14
    sheet = Image.new("RGB", (columns * (thumb + 4), len(rows) * (thumb + caption + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (query, hits) in enumerate(rows):
        y = r * (thumb + caption + 4)
        first = first_labels[r] if first_labels else "query"
        cells = [(query, first)] + [
            (p, f"{i + 1}" + ("" if s is None else f": {s:.3f}")) for i, (p, s) in enumerate(hits)
        ]
        for c, (cell_path, label) in enumerate(cells):
            x = c * (thumb + 4)
            sheet.paste(thumbnail(cell_path, thumb), (x, y))
            draw.text((x + 2, y + thumb + 1), label, fill=(200, 0, 0) if c == 0 else (0, 0, 0))
    return save_png(path, np.asarray(sheet))
