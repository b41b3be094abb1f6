"""`dinokit track`: a video's frames and its first frame's object mask in, every frame's mask out.

DINO's DAVIS-2017 protocol (see maps/tracking.py): patch features of each frame, read whole and
resized as the other maps commands do (model_input), label propagation from the first frame and the
last n_last_frames. Writes <out>/<name>.png (palette PNG, the first mask's indices and palette, at the
frame's size; the first frame's is the given mask), <out>/overlays/<name>.png and <out>/track.json;
with ground_truth= the DAVIS scores J, F and J&F. Every file is written atomically; track.json says
"complete": false until the last frame is written (a run is not resumed: run it again).
"""

import re
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dinokit.data.images import CLASS_INDEX_MODES, open_image, open_rgb, output_names, upright_size
from dinokit.errors import DinokitError
from dinokit.eval.visualize import palette
from dinokit.io import (
    atomic_write,
    prepare_output,
    refuse_files_no_run_wrote,
    refuse_other_outputs,
    refuse_overwriting_inputs,
    write_json,
)
from dinokit.maps import tracking
from dinokit.maps.commands import inputs_without_outputs, load, model_input
from dinokit.maps.pca import patch_features
from dinokit.maps.render import mask_overlay, save_png
from dinokit.models import VisionTransformer
from dinokit.runtime import autocast


def track(
    frames: str,
    first_mask: str,
    out: str = "out/track",
    model: str = "dinov2_vits14",
    ground_truth: str | None = None,
    image_size: int = 448,
    resize_policy: str = "aspect",
    n_last_frames: int = 7,
    size_mask_neighborhood: int = 12,
    topk: int = 5,
    device: str = "auto",
) -> dict:
    """Track the objects of a video's first mask through its frames (DINO's label propagation).

    frames: a folder of the video's images, in natural name order (frame9 before frame10).
    first_mask: the first frame's mask, a class-index PNG (palette, as DAVIS's, or grayscale) of the
    first frame's size: 0 = background, 255 = void (DAVIS's unlabelled pixels, read as background), each
    other index one object. ground_truth: a folder of masks named as the frames (<name>.png), for every
    frame but the first and last (DAVIS scores neither).
    n_last_frames: preceding frames in the context beside the first; size_mask_neighborhood: a target
    patch matches context patches within that many patches (0 = anywhere); topk: matches per patch.

    Returns (and writes to <out>/track.json) the frames, objects, settings and, with ground_truth,
    J_mean, F_mean, J&F_mean (DAVIS-2017, shares in [0, 1]) and per object.
    """
    from dinokit.eval.metrics import video_jf  # scipy and scikit-image: not for `--help`

    check_settings(n_last_frames, size_mask_neighborhood, topk)
    out = str(prepare_output(out, folder=True, create=False))  # "~/..." expanded
    refuse_other_outputs(out, ("track.json",), "dinokit track")
    out_dir = Path(out).expanduser()
    paths = frame_paths(frames, out_dir)
    names = output_names(paths, frames)
    first_rgb = np.asarray(open_rgb(paths[0]))
    check_frame_sizes(paths, first_rgb.shape[:2])
    mask, colours = read_first_mask(first_mask, first_rgb.shape[:2], paths[0])
    objects = tracking.object_values(mask)
    truths = ground_truth_paths(ground_truth, names, first_rgb.shape[:2]) if ground_truth is not None else None
    outputs = [Path(sub, f"{name}.png") for name in names for sub in ("", "overlays")]
    refuse_overwriting_inputs(out_dir, [out_dir / p for p in outputs], [*paths, first_mask, *(truths or [])])
    refuse_files_no_run_wrote(out_dir, outputs, ("track.json",), "dinokit track")  # e.g. out= ground-truth masks
    net = load(model, device)
    grid = net.grid_size(*model_input(net, Image.fromarray(first_rgb), image_size, resize_policy).shape[-2:])
    at_grid = tracking.one_hot_at_grid(mask, objects, grid)  # the objects as the first frame's patches hold them
    unseen = [k for k, patches in zip(objects, at_grid, strict=True) if not patches.any()]
    if unseen:
        print(
            f"note: object(s) {unseen} of the first mask cover no patch of the {grid[0]}x{grid[1]} patch grid and "
            "cannot be tracked: pass a larger image_size"
        )
    settings = {
        "image_size": image_size,
        "resize_policy": resize_policy,
        "n_last_frames": n_last_frames,
        "size_mask_neighborhood": size_mask_neighborhood,
        "topk": topk,
    }
    report = {"complete": False, "model": model, "frames": names, "objects": objects, "settings": settings}
    report |= {"patch_grid": list(grid), "objects_below_the_patch_grid": unseen}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "track.json", report)

    def frames_read():
        for path in paths:
            rgb = first_rgb if path == paths[0] else np.asarray(open_rgb(path))
            check_frame_size(path, rgb.shape[:2], paths[0], first_rgb.shape[:2])
            yield rgb, model_input(net, Image.fromarray(rgb), image_size, resize_policy)

    settings_run = (n_last_frames, size_mask_neighborhood, topk)
    per_frame = track_frames(net, frames_read(), names, mask, colours, out_dir, settings_run, truths, objects)
    report |= {"complete": True, "masks": str(out_dir), "overlays": str(out_dir / "overlays")}
    if truths is not None:
        report["scores"] = video_jf(per_frame, objects) | {"ground_truth": str(ground_truth)}
    write_json(out_dir / "track.json", report)
    return report


def track_frames(
    net: VisionTransformer,
    frames: Iterable[tuple[np.ndarray, torch.Tensor]],
    names: list[str],
    mask: np.ndarray,
    colours: np.ndarray,
    out_dir: Path,
    settings: tuple[int, int, int],
    truths: list[Path | None] | None = None,
    objects: list[int] | None = None,
    overlays: bool = True,
    precision: str = "fp32",
    desc: str = "track",
) -> list | None:
    """One video tracked and written (`dinokit track`, and each sequence of `dinokit eval video`).

    frames: per frame, the first included, its (H, W, 3) uint8 RGB and its model input (3, H', W'), e.g.
    a generator reading them one at a time; names: their output names; mask: the first frame's (H, W)
    indices, `colours` (256, 3) its palette; settings: (n_last_frames, size_mask_neighborhood, topk).
    Writes <out_dir>/<name>.png per frame (palette PNG at the frame's size; the first is `mask`) and with
    `overlays` <out_dir>/overlays/<name>.png. With `truths` (per frame a ground-truth mask's path, None for
    the unscored first and last) returns per frame `frame_jf` of `objects` (None where unscored), else None.
    """
    from dinokit.eval.metrics import frame_jf

    objects = tracking.object_values(mask) if objects is None else objects
    pictures: deque[np.ndarray] = deque()  # the frames whose features were computed, not yet written
    device = next(net.parameters()).device

    def features():
        for rgb, x in frames:
            pictures.append(np.asarray(rgb))
            with autocast(device, precision):  # the features only: never held across the yield
                tokens = patch_features(net, [x.to(device)])[0]
            yield torch.from_numpy(tokens).to(device)

    masks = tracking.track(features(), mask, net.patch_size, *settings)
    per_frame = []
    bar = tqdm(zip(names, masks, strict=True), total=len(names), desc=desc, unit="frame")
    for i, (name, predicted) in enumerate(bar):
        rgb = pictures.popleft()
        save_indexed(out_dir / f"{name}.png", predicted, colours)
        if overlays:
            tinted = rgb
            for k in objects:
                tinted = mask_overlay(tinted, predicted == k, colour=tuple(int(c) for c in colours[k]))
            save_png(out_dir / "overlays" / f"{name}.png", tinted)
        if truths is not None:
            scored = 0 < i < len(names) - 1
            per_frame.append(frame_jf(predicted, read_truth(truths[i], rgb.shape[:2]), objects) if scored else None)
    return per_frame if truths is not None else None


def check_settings(n_last_frames: int, size_mask_neighborhood: int, topk: int) -> None:
    if n_last_frames < 0:
        raise DinokitError(f"n_last_frames must be 0 or more (DINO uses 7), got {n_last_frames}")
    if size_mask_neighborhood < 0:
        raise DinokitError(
            f"size_mask_neighborhood must be 0 (no restriction) or a number of patches (DINO uses 12), "
            f"got {size_mask_neighborhood}"
        )
    if topk < 1:
        raise DinokitError(f"topk must be 1 or more (DINO uses 5), got {topk}")


def check_frame_sizes(paths: list[Path], size: tuple[int, int]) -> None:
    """A DinokitError, before any work, where a frame's header gives another size than the first's."""
    for path in paths[1:]:
        found = upright_size(path)
        if found is not None:
            check_frame_size(path, found, paths[0], size)


def check_frame_size(path: Path, found: tuple[int, int], first: Path, size: tuple[int, int]) -> None:
    if tuple(found) != tuple(size):
        raise DinokitError(
            f"the frame {path} is {found[1]}x{found[0]} pixels but the first frame {first} is {size[1]}x{size[0]}: "
            "a video's frames share one size"
        )


def natural_key(path: Path) -> list:
    """Sort key putting frame9 before frame10: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.casefold() for part in re.split(r"(\d+)", str(path))]


def frame_paths(frames: str, out: Path) -> list[Path]:
    """The video's frames: the images of the folder `frames` (less out= inside it), in natural order."""
    folder = Path(frames).expanduser()
    if not folder.is_dir():
        raise DinokitError(f"frames={frames} is not a folder: pass the folder of the video's frames, one image each")
    return sorted(inputs_without_outputs(str(folder), out), key=natural_key)


def read_first_mask(path: str, size: tuple[int, int], first_frame: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first frame's (H, W) index mask and its (256, 3) uint8 palette (the PNG's own, else dinokit's
    class colours); a DinokitError unless it is a class-index image of `size` (H, W) marking an object."""
    im = open_image(path, what="first mask")
    if im.mode not in CLASS_INDEX_MODES:
        raise DinokitError(
            f"the first mask {path} is a {im.mode} image (colours): save it as a class-index PNG (palette, as "
            "DAVIS's, or grayscale) with 0 = background and 1, 2, ... one index per object"
        )
    mask = np.asarray(im).astype(np.int64)
    if mask.shape != tuple(size):
        raise DinokitError(
            f"the first mask {path} is {mask.shape[1]}x{mask.shape[0]} pixels (width x height) but the first frame "
            f"{first_frame} is {size[1]}x{size[0]}: save the mask at its frame's size"
        )
    if not mask.any():
        raise DinokitError(f"the first mask {path} marks no object (all 0 = background): mark each object 1, 2, ...")
    if mask.min() < 0 or mask.max() > 255:
        raise DinokitError(
            f"the first mask {path} holds indices up to {mask.max()}: a palette mask holds 0..255; number the "
            "objects 1, 2, ..."
        )
    colours = palette(256)
    own = np.asarray(im.getpalette() or [], dtype=np.uint8).reshape(-1, 3) if im.mode == "P" else colours[:0]
    colours[: len(own)] = own
    return mask.astype(np.uint8), colours


def ground_truth_paths(ground_truth: str, names: list[str], size: tuple[int, int]) -> list[Path | None]:
    """Per frame its ground-truth mask <ground_truth>/<name>.png (None for the first and last frames,
    which DAVIS does not score); a DinokitError naming the missing ones, or one whose header gives
    another size than the frames' (H, W)."""
    folder = Path(ground_truth).expanduser()
    if not folder.is_dir():
        raise DinokitError(f"ground_truth={ground_truth} is not a folder: pass the folder of per-frame masks")
    if len(names) < 3:
        raise DinokitError(
            f"DAVIS scores leave out the first and last frames, and the video has {len(names)}: scores need 3 "
            "frames or more (leave ground_truth out)"
        )
    paths = [None if i in (0, len(names) - 1) else folder / f"{name}.png" for i, name in enumerate(names)]
    missing = [p.name for p in paths if p is not None and not p.is_file()]
    if missing:
        listed = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DinokitError(
            f"ground_truth={ground_truth} lacks {len(missing)} of the frames' masks ({listed}): it needs <frame "
            "name>.png for every frame but the first and last"
        )
    for path in paths[1:-1]:
        found = upright_size(path)
        if found is not None and tuple(found) != tuple(size):
            raise DinokitError(
                f"the ground-truth mask {path} is {found[1]}x{found[0]} pixels but the frames are {size[1]}x{size[0]}: "
                "a frame's mask has its size"
            )
    return paths


def read_truth(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth (H, W) index mask; a DinokitError unless it is a class-index image of `size`."""
    im = open_image(path, what="ground-truth mask")
    if im.mode not in CLASS_INDEX_MODES or im.size != (size[1], size[0]):
        raise DinokitError(
            f"the ground-truth mask {path} is a {im.width}x{im.height} {im.mode} image: it must be a class-index "
            f"PNG (palette or grayscale) of its frame's size, {size[1]}x{size[0]}"
        )
    return np.asarray(im).astype(np.int64)


def save_indexed(path: Path, mask: np.ndarray, colours: np.ndarray) -> None:
    """Write a uint8 (H, W) index mask as a palette PNG with (256, 3) `colours`, atomically."""
    image = Image.fromarray(mask.astype(np.uint8))
    image.putpalette(colours.ravel().tolist())  # an L image becomes P, its values the indices
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
