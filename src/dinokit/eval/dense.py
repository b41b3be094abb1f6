"""What the dense probes share: image / target folder pairs, cached per-block patch features, the
training loop of a linear head on them, and prediction at each image's own size.

Data: `root/images/<name>.<ext>` with `root/masks/<name>.png` (segmentation: class index per pixel,
`ignore_index` for unlabelled pixels) or `root/depth/<name>.png|.tif|.npy` (depth: integer data, e.g. a
16-bit PNG or a uint16 .npy, in units of 1/depth_scale metres; float data, a float .npy or a float
(mode F) TIFF, in metres; 0 = no measurement). `<name>` is the path under images/ without extension,
so subfolders are mirrored under masks/ or depth/. A pair whose image or target cannot be read is skipped
and counted, as is one whose target does not have its image's shape (the same size, or a scaled copy of it).
Images are resized whole (no crop) to image_size x image_size, so features and targets stay aligned;
a head's output is upsampled bilinearly to the target, at training time to image_size and at
evaluation to each image's original size. Training reads the cached features (no augmentation:
features once, probes many).
"""

import contextlib
import json
import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from dinokit.data.images import (
    CLASS_INDEX_MODES,
    UnreadableImage,
    check_readable,
    files_under,
    list_images,
    open_image,
    output_names,
    plain_path,
    same_aspect,
    upright_size,
)
from dinokit.errors import DinokitError, require
from dinokit.eval.cache import Features
from dinokit.eval.common import Backbone, make_transform, split_features
from dinokit.io import (
    atomic_write,
    folder_lock,
    read_json,
    refuse_files_no_run_wrote,
    refuse_overwriting_inputs,
    sync,
    write_json,
)
from dinokit.runtime import keeps_global_rng, reuse_freed_memory


# ---------------------------------------------------------------------------------------------- data
def pair_key(path: Path, folder: Path) -> str:
    """The name a file is paired by: its path under `folder` without extension (images/a/01.jpg and
    masks/a/01.png -> "a/01")."""
    return path.relative_to(folder).with_suffix("").as_posix()


def read_pairs(root: str | Path, target_folder: str, target_exts: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """(image paths, target paths) of `root/images` and `root/<target_folder>`, matched by path relative
    to each folder without extension (subfolders of images/ are mirrored under the target folder)."""
    root = plain_path(Path(root).expanduser())  # as list_images spells the image paths
    images_dir, targets_dir = root / "images", root / target_folder
    if not images_dir.is_dir() or not targets_dir.is_dir():
        raise DinokitError(
            f"{root} must hold images/ and {target_folder}/ folders with files of the same names "
            f"(e.g. images/0001.jpg and {target_folder}/0001{target_exts[0]})"
        )
    images = list_images(images_dir)
    image_keys = by_key(images, images_dir)
    for key, same in image_keys.items():
        if len(same) > 1:
            raise DinokitError(
                f"{same[0]} and {same[1]} would share the {target_folder} file {target_folder}/{key}.*: "
                "images are paired with targets by name without extension; rename or remove one of them"
            )
    candidates = files_under(targets_dir, target_exts)
    targets = by_key(candidates, targets_dir)
    missing = [p for p in images if pair_key(p, images_dir) not in targets]
    if missing:
        key = pair_key(missing[0], images_dir)
        raise DinokitError(
            f"{len(missing)} image(s) in {images_dir} have no {target_folder} file in {targets_dir} "
            f"(e.g. {missing[0].relative_to(images_dir)} needs {target_folder}/{key}{target_exts[0]}; "
            f"subfolders of images/ are mirrored under {target_folder}/)"
        )
    keys = [pair_key(p, images_dir) for p in images]
    for key in keys:
        if len(targets[key]) > 1:
            raise DinokitError(
                f"{targets[key][0]} and {targets[key][1]} are both the {target_folder} file of "
                f"images/{key}: keep one of them"
            )
    return images, [targets[key][0] for key in keys]


def by_key(paths: list[Path], folder: Path) -> dict[str, list[Path]]:
    """{pair_key: the paths with that key}."""
    keys: dict[str, list[Path]] = {}
    for p in paths:
        keys.setdefault(pair_key(p, folder), []).append(p)
    return keys


def read_mask(path: Path) -> np.ndarray:
    """(H, W) int64 class indices of a single-channel (1-bit, L, P, I;16 or I) PNG, in its EXIF
    orientation (as its image). A 1-bit mask (a boolean array saved by Pillow) holds classes 0 and 1."""
    im = open_image(path, what="mask")
    if im.mode not in CLASS_INDEX_MODES:
        raise DinokitError(
            f"{path} is a {im.mode} image; a mask must hold one class index per pixel "
            "(1/8/16-bit grayscale or palette PNG), not colours"
        )
    return np.asarray(im).astype(np.int64)


def read_depth(path: Path, depth_scale: float) -> np.ndarray:
    """(H, W) float32 metres. Float data is in metres (a float .npy or TIFF); integer data (a 16-bit PNG,
    an integer TIFF, or an integer .npy such as uint16 millimetres saved with np.save) is in 1/depth_scale
    metres and divided by depth_scale. NaN and infinities become 0 (no measurement). Images are read in
    their EXIF orientation (as their photos)."""
    if path.suffix.lower() == ".npy":
        depth = np.load(path, allow_pickle=False)
    else:
        depth = np.asarray(open_image(path, what="depth map"))
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise DinokitError(
            f"{path} holds an array of shape {depth.shape}; a depth map must be (H, W): one channel, "
            "a 16-bit PNG or a float TIFF / .npy"
        )
    if not np.issubdtype(depth.dtype, np.floating):  # the file's type says its unit, whatever its format
        return depth.astype(np.float32) / depth_scale
    return np.nan_to_num(depth.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def resize_target(target: np.ndarray, size: int) -> torch.Tensor:
    """Nearest-neighbour resize of an (H, W) target to (size, size), so labels and depths are not mixed;
    class indices come back as int16 (int32 beyond its range), depths as float32."""
    t = F.interpolate(torch.from_numpy(target)[None, None].float(), size=(size, size), mode="nearest")[0, 0]
    if np.issubdtype(target.dtype, np.integer):
        small = target.size == 0 or (target.min() >= -(2**15) and target.max() < 2**15)
        return t.to(torch.int16 if small else torch.int32)
    return t


# a damaged target file (truncated, not an image, a broken .npy) is skipped with its image
UNREADABLE = (UnreadableImage, OSError, ValueError, EOFError)


@dataclass
class Target:
    """One target file as the probes keep it: resized to the training size, its full (H, W), and its
    largest value (the ignore value excluded; None if it has no other value)."""

    small: torch.Tensor
    size: tuple[int, int]
    peak: float | None


def read_targets(
    paths: list[Path], read_target, image_size: int, ignore: int | None
) -> tuple[list[Target | None], list[tuple[Path, str]]]:
    """Read every target once at full size: ([Target, or None where unreadable], [(bad file, why)])."""
    out, bad = [], []
    for path in paths:
        try:
            target = read_target(path)
        except UNREADABLE as err:
            out.append(None)
            bad.append((path, err.reason if isinstance(err, UnreadableImage) else f"{type(err).__name__}: {err}"))
            continue
        values = target if ignore is None else target[target != ignore]
        peak = float(values.max()) if values.size else None
        out.append(Target(resize_target(target, image_size), tuple(target.shape), peak))
    return out, bad


@dataclass
class DenseSplit:
    """Cached features of the readable images of a split, their targets at the training size, and the
    target files (read at full size for evaluation)."""

    features: Features
    images: list[Path]  # the readable images, in feature order
    target_paths: list[Path]
    train_targets: torch.Tensor  # (N, S, S) at image_size
    sizes: list[tuple[int, int]]  # (H, W) of each full-size target
    grid: tuple[int, int]
    name: str
    names: list[str] = field(default_factory=list)  # each pair's key (path under images/ without extension)
    target_max: float | None = None  # largest full-size target value of the kept pairs (ignore value excluded)
    bad_files: int = 0  # pairs skipped: unreadable images and unreadable targets

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(patch tokens (B, L, N, D) float32, block CLS (B, L, D) or None)."""
        tokens = torch.from_numpy(self.features.rows("layer_patch_tokens", positions)).float()
        cls = None
        if "layers" in self.features.shards:
            cls = torch.from_numpy(self.features.rows("layers", positions)).float()
        return tokens, cls


def dense_split(
    backbone: Backbone,
    root: str,
    target_folder: str,
    target_exts: tuple[str, ...],
    read_target,
    image_size: int,
    layers: tuple[int, ...],
    with_cls: bool,
    norm: bool,
    cache: Path | None,
    batch_size: int,
    num_workers: int,
    precision: str,
    ignore: int | None = None,
) -> DenseSplit:
    """Read a split's pairs and their full-size targets (pairs with an unreadable target skipped and
    counted), take the features of the rest from the cache (extracting what is missing)."""
    from dinokit.data.transforms import check_model_input_size  # torchvision: not for `--help`

    check_model_input_size(backbone.model, image_size)
    images, target_paths = read_pairs(root, target_folder, target_exts)
    targets, bad = read_targets(target_paths, read_target, image_size, ignore)
    for i, target in enumerate(targets):  # a target of another picture's shape would be stretched onto it
        shape = upright_size(images[i]) if target is not None else None
        if shape is not None and not same_aspect(shape, target.size):
            targets[i] = None
            bad.append((target_paths[i], f"{target.size[0]}x{target.size[1]} for a {shape[0]}x{shape[1]} image"))
    readable = [i for i, t in enumerate(targets) if t is not None]
    if bad:
        where = f"e.g. {bad[0][0]} ({bad[0][1]})"
        if not readable:
            raise DinokitError(
                f"none of the {len(images)} {target_folder} files of {root} could be read and fit its image, {where}"
            )
        print(f"{root}: skipped {len(bad)} {target_folder} file(s) unreadable or not fitting their image, {where}")
    transform = make_transform(image_size, "resize")
    which = ("layer_patch_tokens", "layers") if with_cls else ("layer_patch_tokens",)
    paths = [images[i] for i in readable]
    feats = split_features(
        backbone, root, paths, transform, which, layers, norm, cache, batch_size, num_workers, precision
    )
    kept = [readable[i] for i in feats.kept.tolist()]
    peaks = [targets[i].peak for i in kept if targets[i].peak is not None]
    side = image_size // backbone.model.patch_size
    images_dir = plain_path(Path(root).expanduser()) / "images"  # as read_pairs spells the image paths
    return DenseSplit(
        feats,
        [images[i] for i in kept],
        [target_paths[i] for i in kept],
        torch.stack([targets[i].small for i in kept]),
        [targets[i].size for i in kept],
        (side, side),
        str(root),
        [pair_key(images[i], images_dir) for i in kept],
        max(peaks) if peaks else None,
        len(feats.bad) + len(bad),
    )


# --------------------------------------------------------------------------------------------- heads
def patch_maps(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, L, N, D) patch tokens -> (B, L*D, h, w) feature map, blocks concatenated oldest first."""
    b, n_layers, _, d = tokens.shape
    h, w = grid
    return tokens.permute(0, 1, 3, 2).reshape(b, n_layers * d, h, w)


def upsample(output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (B, C, h, w) head output to `size` (align_corners=False, as mmseg)."""
    if tuple(output.shape[-2:]) == tuple(size):
        return output
    return F.interpolate(output, size=size, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------- results folder
DENSE_TASKS = ("segmentation", "depth")  # their results share out/metrics.jsonl and out/examples/


def check_results_folder(out_dir: Path, task: str) -> None:
    """Refuse an out folder (before any work) that holds the other dense probe's results, whose
    metrics.jsonl and examples/ this run would replace, or files of those names (or its head's) that
    no eval `task` run wrote there (a folder of the user's own: out=. in a project with examples/)."""
    for other in DENSE_TASKS:
        if other != task and (out_dir / f"{other}.json").exists():
            raise DinokitError(
                f"out={out_dir} holds the results of eval {other} ({other}.json), whose metrics.jsonl and "
                f"examples/ eval {task} would replace: choose another out folder"
            )
    marks = (f"{task}.json", results_record(task))  # the results of an earlier run, or its record written first
    refuse_files_no_run_wrote(out_dir, result_files(task), marks, f"dinokit eval {task}")


def result_files(task: str) -> tuple[str, ...]:
    """The files and folders of an eval `task` run that a rerun replaces (beside its result json)."""
    return (f"{task}_head.safetensors", "metrics.jsonl", "examples")


def results_record(task: str) -> str:
    """The file that marks a folder's `result_files` as written by eval `task` (from before the first)."""
    return f".dinokit-eval-{task}.json"


@contextlib.contextmanager
def results_folder(out_dir: Path, task: str) -> Iterator[None]:
    """Hold `out_dir` (io.folder_lock, creating it) while eval `task` checks, clears and writes its
    results there: a second run into it meanwhile fails at once, as a second `dinokit pretrain` does,
    instead of writing its head and metrics beside the first one's result json."""
    with folder_lock(out_dir, f"eval {task} results", wait=False):
        check_results_folder(out_dir, task)
        yield


def clear_results(out_dir: Path, task: str) -> None:
    """Remove an earlier run's outputs from `out_dir` (created if missing) before writing any new one:
    first its result json `<task>.json`, then its head, metrics.jsonl and examples/. With the result
    json written last, it only ever stands beside its own run's files: a rerun stopped partway leaves
    no result json, never an earlier one beside new files, nor stale example PNGs beside a new one.
    Called inside `results_folder`, whose check_results_folder has made sure that they are an eval run's;
    the `results_record` written first says so to the next run, should this one stop before its result json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / results_record(task), {"written_by": f"dinokit eval {task}", "files": result_files(task)})
    (out_dir / f"{task}.json").unlink(missing_ok=True)
    sync(out_dir)  # the result is gone (power cut included) before any new file appears
    (out_dir / f"{task}_head.safetensors").unlink(missing_ok=True)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "examples", ignore_errors=True)


# -------------------------------------------------------------------------------------------- training
def refuse_training_with_head(head: str, train: str | None) -> None:
    """`eval segmentation|depth head=` scores a saved or released head on val= as it is: train= is refused."""
    if train is not None:
        raise DinokitError(
            f"train= and head= exclude each other: head={head} is scored on val= as it is (no training); "
            "leave train= out, or head= out to train a new head"
        )


def check_training(epochs: int, train_batch_size: int, lr: float, weight_decay: float) -> None:
    """Refuse, before any work, settings that train no head (epochs=0 or lr=0 reported the untrained
    head) or cannot (train_batch_size=0 divided by zero, AdamW refused a negative lr or weight decay,
    after the features were extracted)."""
    require(
        [
            (epochs >= 1, f"epochs must be >= 1 (passes over the train features), got {epochs}"),
            (train_batch_size >= 1, f"train_batch_size must be >= 1, got {train_batch_size}"),
            (lr > 0, f"lr must be > 0 (AdamW's peak learning rate), got {lr}"),
            (weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}"),
        ]
    )


@keeps_global_rng
def train_dense_head(
    head: nn.Module,
    loss_fn,
    split: DenseSplit,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device,
    log_path: Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """AdamW + cosine schedule on the cached features; the loss compares the head's output upsampled
    to the training size with the targets. Returns (and writes to log_path) one record per epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head.to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(split) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=0.0)
    size = tuple(split.train_targets.shape[-2:])
    log = []
    bar = tqdm(total=steps, desc="dense head", unit="step", disable=not progress, leave=False)
    # each step's upsampled outputs and their gradients are large tensors made afresh: on a CPU,
    # reusing freed memory makes a step 1.9x faster (16 x 21 classes at 224 px, docs/benchmarks.md)
    with reuse_freed_memory(device.type == "cpu"):
        for epoch in range(epochs):
            total, count = 0.0, 0
            order = rng.permutation(len(split))
            for start in range(0, len(split), batch_size):
                positions = order[start : start + batch_size]
                tokens, cls = split.batch(positions)
                output = head(tokens.to(device), None if cls is None else cls.to(device), split.grid)
                loss = loss_fn(upsample(output, size), split.train_targets[positions].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(positions)
                count += len(positions)
                bar.update()
            log.append({"epoch": epoch + 1, "loss": total / count, "lr": schedule.get_last_lr()[0]})
            if log_path is not None:
                text = "".join(json.dumps(r) + "\n" for r in log)
                atomic_write(log_path, lambda tmp, text=text: Path(tmp).write_text(text))
    bar.close()
    head.eval()
    return log


@torch.no_grad()
def predict_split(head: nn.Module, split: DenseSplit, device: torch.device, batch_size: int = 16):
    """Yield (position, head output (C, H, W) upsampled to the original size of the image's target)."""
    for start in range(0, len(split), batch_size):
        positions = np.arange(start, min(start + batch_size, len(split)))
        tokens, cls = split.batch(positions)
        output = head(tokens.to(device), None if cls is None else cls.to(device), split.grid).float().cpu()
        for j, pos in enumerate(positions):
            yield int(pos), upsample(output[j : j + 1], split.sizes[pos])[0]


# ------------------------------------------------------------------------------------ new images
@torch.no_grad()
def predict_images(
    head: nn.Module,
    meta: dict,
    backbone: Backbone,
    images: str,
    out_files: tuple[Path, tuple[str, ...]],
    batch_size: int,
    num_workers: int,
    precision: str,
):
    """Yield (output name, RGB array at original size, head output (C, H, W) at that size); the name is
    the image's path under the `images` folder without extension (its stem for a list or one file).
    out_files: (output folder, suffixes of the files written per name), checked against the inputs.
    The output folder is held (io.folder_lock) until the last prediction: a second predict or eval run
    into it meanwhile fails at once."""
    with prediction_files(images, out_files) as (paths, names):
        bad: list[int] = []
        for i, rgb, output in head_outputs(head, meta, backbone, paths, batch_size, num_workers, precision, bad):
            yield names[i], rgb, output
        if bad:
            print(f"skipped {len(bad)} unreadable image(s), e.g. {paths[bad[0]]}")


@torch.no_grad()
def head_outputs(
    head: nn.Module,
    meta: dict,
    backbone: Backbone,
    paths: list[Path],
    batch_size: int,
    num_workers: int,
    precision: str,
    bad: list[int],
) -> Iterator[tuple[int, np.ndarray, torch.Tensor]]:
    """Yield (index into paths, RGB array at original size, head output (C, H, W) at that size) of each
    readable image, as its head file (`meta`) says the head was trained: decode, resize, blocks, norm.
    The indices of unreadable images are appended to `bad`."""
    from dinokit.data.images import open_rgb
    from dinokit.eval.heads import head_inputs

    # decoded as the head's training images were (whole for a head written before the reduced decode)
    transform = make_transform(meta["image_size"], "resize", meta.get("reduced_decode", False))
    which = ("layer_patch_tokens", "layers") if meta.get("with_cls") else ("layer_patch_tokens",)
    side = meta["image_size"] // meta["patch_size"]
    device = next(head.parameters()).device
    loader = dict(batch_size=batch_size, num_workers=num_workers, precision=precision)
    for good, feats, bad_batch in head_inputs(backbone, paths, meta, which, transform, **loader):
        bad += bad_batch
        if not feats:
            continue
        cls = feats["layers"].to(device) if "layers" in feats else None
        output = head(feats["layer_patch_tokens"].to(device), cls, (side, side)).float().cpu()
        for j, i in enumerate(good.tolist()):
            rgb = np.asarray(open_rgb(paths[i]))
            yield i, rgb, upsample(output[j : j + 1], rgb.shape[:2])[0]


def picture_outputs(
    paths: Iterable[Path], predict: Callable[[Image.Image], np.ndarray], bad: list[int], desc: str = "predict"
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (index into paths, RGB array, predict(its RGB picture)) of each readable image, one at a time,
    decoded upright (the released heads' counterpart of `head_outputs`), with a progress bar named `desc`
    (an image can take a minute on a CPU). The indices of unreadable images are appended to `bad`."""
    from dinokit.data.images import open_rgb

    for i, path in enumerate(tqdm(list(paths), desc=desc, unit="image", leave=False)):
        try:
            picture = open_rgb(path)
        except UnreadableImage:
            bad.append(i)
            continue
        yield i, np.asarray(picture), predict(picture)


@contextlib.contextmanager
def prediction_files(
    images: str, out_files: tuple[Path, tuple[str, ...]], once: tuple[str, ...] = ()
) -> Iterator[tuple[list[Path], list[str]]]:
    """(image paths, output names) of a predict run over `images`, its output folder held (io.folder_lock)
    meanwhile: outputs that would replace an input and an input of no readable image are refused first,
    then the earlier run's predictions are removed and this run's files recorded (`replace_predictions`).
    out_files: (output folder, suffixes of the files written per name); once: files written once per
    run (e.g. classes.json), recorded with them."""
    paths = list_images(images)
    names = output_names(paths, Path(images).expanduser())
    out_dir, suffixes = out_files
    files = [f"{name}{suffix}" for name in names for suffix in suffixes]
    refuse_overwriting_inputs(out_dir, [out_dir / f for f in files], paths)  # e.g. out= the images, PNGs
    check_readable(paths, images)
    with folder_lock(out_dir, "predictions", wait=False):  # one predict or eval at a time in out
        replace_predictions(out_dir, [*files, *once], paths)
        yield paths, names


PREDICTIONS_RECORD = ".dinokit-predictions.json"  # the files a predict command wrote in its out folder


def replace_predictions(out_dir: Path, files: list[str], inputs: list[Path]) -> None:
    """Before a predict run writes anything: remove from `out_dir` (created if missing) the prediction
    files that an earlier run recorded in PREDICTIONS_RECORD, then record `files` (paths under
    `out_dir`) as this run's. A rerun so leaves only its own predictions, never those of images no
    longer in its input; one stopped partway is cleaned up by the next. Other files are never removed,
    nor any that is an input image of this run or lies outside `out_dir`; a file of `files` already in
    `out_dir` but not in the record (e.g. out= the ground-truth masks) is refused, before any change."""
    record = out_dir / PREDICTIONS_RECORD
    fix = f"remove {record} (the earlier run's predictions then stay), or predict into a new out= folder"
    earlier = read_json(record, fix).get("files", []) if record.is_file() else []
    others = [name for name in files if name not in earlier and (out_dir / name).exists()]
    if others:  # e.g. out= the ground-truth masks: files of this run's names that no predict run wrote
        raise DinokitError(
            f"out={out_dir} holds {others[0]}"
            + (f" (and {len(others) - 1} more)" if len(others) > 1 else "")
            + ", a file of a prediction's name that no predict run wrote there, which this one would replace: "
            "predict into a new or empty out= folder"
        )
    if earlier:
        root, keep = out_dir.resolve(), {p.resolve() for p in inputs}
        for name in earlier:
            path = (out_dir / name).resolve()
            if path.is_relative_to(root) and path not in keep and path.is_file():
                path.unlink(missing_ok=True)
                remove_empty_folders(path.parent, root)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(record, {"files": files})


def remove_empty_folders(folder: Path, root: Path) -> None:
    """Remove `folder` and its parents below `root` while they are empty (a removed prediction's
    subfolders)."""
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone)
            return
        folder = folder.parent
