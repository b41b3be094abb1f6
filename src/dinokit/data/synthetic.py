"""Procedurally rendered scenes of shapes with exact ground truth: class, segmentation mask and depth.

No public dataset can be downloaded here, so the demo and the tests render their own. A scene is a
textured background plane receding with image height (depth 6 m at the bottom to 12 m at the top)
with shapes standing in front of it at depth 1.5-5 m; a shape's size scales as 1/depth, as in a
pinhole camera, and shapes are painted far to near so that mask and depth agree with the image.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dinokit.io import atomic_write

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")
NEAR, FAR = 1.5, 5.0  # shape depth range (m)
BACKGROUND_DEPTH = (6.0, 12.0)  # background depth at the bottom and top rows (m)


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8: 0 background, 1 + index into SHAPES
    depth: np.ndarray  # (H, W) float32 metres
    label: int  # index into SHAPES of the largest visible shape


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring_points(n: int, radius_of) -> list[tuple[float, float]]:
        return [
            (
                cx + radius_of(i) * math.cos(angle + 2 * math.pi * i / n),
                cy + radius_of(i) * math.sin(angle + 2 * math.pi * i / n),
            )
            for i in range(n)
        ]

    if kind == "square":
        return ring_points(4, lambda i: r)
    if kind == "triangle":
        return ring_points(3, lambda i: r)
    if kind == "hexagon":
        return ring_points(6, lambda i: r)
    if kind == "star":
        return ring_points(10, lambda i: r if i % 2 == 0 else 0.45 * r)
    if kind == "cross":
        w = 0.35 * r
        pts = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(kind)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if kind in ("circle", "ring", "crescent"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)


def _cut_out(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    """Second pass for shapes with holes: the ring's hole and the crescent's bite show what is behind."""
    if kind == "ring":
        draw.ellipse([cx - 0.5 * r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r], fill=fill)
    elif kind == "crescent":
        ox, oy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
        draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=fill)


def render_scene(rng: np.random.Generator, size: int = 64, num_shapes: int = 1, shapes=SHAPES) -> Scene:
    """One scene of `num_shapes` shapes drawn from `shapes`, at `size` x `size` pixels."""
    h = w = size
    rows = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None]  # 1 at the top row
    depth = np.repeat(BACKGROUND_DEPTH[0] + (BACKGROUND_DEPTH[1] - BACKGROUND_DEPTH[0]) * rows, w, axis=1)
    base = rng.uniform(40, 215, 3)
    tint = rng.uniform(-40, 40, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / size
    freq = rng.uniform(3, 9)
    stripes = np.sin(2 * math.pi * freq * (xx * math.cos(rng.uniform(0, math.pi)) + yy)) * rng.uniform(5, 25)
    background = base + tint * yy[..., None] + stripes[..., None] + rng.normal(0, 6, (h, w, 3))
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    mask = np.zeros((h, w), dtype=np.uint8)

    placed = []
    for _ in range(num_shapes):
        kind_index = int(rng.integers(len(shapes)))
        d = float(rng.uniform(NEAR, FAR))
        r = size * 0.38 * NEAR / d * rng.uniform(0.85, 1.15)
        placed.append(
            (
                d,
                SHAPES.index(shapes[kind_index]),
                rng.uniform(r * 0.6, w - r * 0.6),
                rng.uniform(r * 0.6, h - r * 0.6),
                r,
            )
        )
    for d, kind_index, cx, cy, r in sorted(placed, reverse=True):  # far to near
        kind = SHAPES[kind_index]
        angle = float(rng.uniform(0, 2 * math.pi))
        color = tuple(int(c) for c in np.clip(rng.uniform(0, 255, 3) * (0.6 + 0.4 * NEAR / d), 0, 255))
        region = Image.new("L", (w, h), 0)
        region_draw = ImageDraw.Draw(region)
        _draw_shape(region_draw, kind, cx, cy, r, angle, 255)
        _cut_out(region_draw, kind, cx, cy, r, angle, 0)
        inside = np.asarray(region) > 127
        canvas.paste(Image.new("RGB", (w, h), color), mask=Image.fromarray((inside * 255).astype(np.uint8)))
        mask[inside] = kind_index + 1
        depth[inside] = d
    visible = np.bincount(mask.ravel(), minlength=len(SHAPES) + 1)[1:]
    image = np.asarray(canvas)
    return Scene(image=image, mask=mask, depth=depth.astype(np.float32), label=int(visible.argmax()))


def write_classification_set(
    root: str | Path, per_class: int, size: int = 64, seed: int = 0, split: str = "train"
) -> Path:
    """`root/<split>/<shape>/<i>.png`, `per_class` images per shape, one shape per image."""
    rng = np.random.default_rng(seed)
    out = Path(root) / split
    for index, kind in enumerate(SHAPES):
        (out / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            scene = render_scene(rng, size, num_shapes=1, shapes=(SHAPES[index],))
            _save_png(out / kind / f"{i:05d}.png", scene.image)
    return out


def write_dense_set(
    root: str | Path, count: int, size: int = 64, seed: int = 0, num_shapes: tuple[int, int] = (1, 4)
) -> Path:
    """`root/images/<i>.png`, `root/masks/<i>.png` (class index, 0 = background) and `root/depth/<i>.png`
    (uint16 millimetres) for `count` scenes with several shapes each."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for sub in ("images", "masks", "depth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene = render_scene(rng, size, num_shapes=int(rng.integers(num_shapes[0], num_shapes[1] + 1)))
        _save_png(root / "images" / f"{i:05d}.png", scene.image)
        _save_png(root / "masks" / f"{i:05d}.png", scene.mask)
        _save_png(root / "depth" / f"{i:05d}.png", np.round(scene.depth * 1000).astype(np.uint16))
    return root


def _save_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
