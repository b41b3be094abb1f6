"""Scores of a saved or released dense head on a labelled split, without training one:
`dinokit eval segmentation head=... val=DIR` and `dinokit eval depth head=... val=DIR`.

Each image is predicted exactly as `dinokit predict` predicts it: a released DINOv2 head through its own
inference (`released_segmentation.segment_image`, the `released_depth.ReleasedDepther`), a dinokit head
file through `dense.head_outputs` (the code path of `predict_images`); except where the released configs'
evaluation differs from the notebooks predict follows, since a released head is scored to reproduce its
published numbers: an ms segmentation head is scored over the configs' 5 ratios [1.0, 1.32, 1.73, 2.28, 3.0]
with flips by default (`SCORING_SCALES`; predict segmentation: the notebook's first 3; `scales=` sets
either), and a released depth head's depth is averaged with the mirror image's (`ReleasedDepther(flip=True)`),
as the released NYU and KITTI configs' test pipelines do (`MultiScaleFlipAug(flip=True)`), where predict
depth follows the hub (no flip). The result's protocol records the scales and flip that ran.
The val folder has the training probes' layout (`dense.read_pairs`): images/ with masks/ or depth/ of the
same names and sizes.

Segmentation, as mmseg scores it: per-class intersection and union accumulated over the whole split
(`metrics.confusion_matrix`), IoU of the classes present (union > 0) averaged (mIoU), aAcc = correct /
labelled pixels, mAcc = mean per-class accuracy. ADE20K annotations hold 0 = "other" and 1..150 = the
classes: `reduce_zero_label` maps them as mmseg does (0 -> 255, ignored; k -> k - 1; 255 stays 255).
Depth, as the Monocular-Depth-Estimation-Toolbox that DINOv2's depth evaluation used
(depth/core/evaluation/metrics.py, depth/datasets/nyu.py, kitti.py): per image over the pixels with
min_depth < gt < max_depth (strict, as the toolbox; gt <= max_depth for a dinokit head, as its training run
scored it: a background at the range's top counts) inside the evaluation crop, then averaged over images:
`eigen` = NYU's rows 45..470, columns 41..600 of its 480 x 640 maps; `garg` = KITTI's rows
int(0.40810811 H)..int(0.99189189 H) - 1, columns int(0.03594771 W)..int(0.96405229 W) - 1; `kb_garg` (a
KITTI head's default) = the released KITTI configs' protocol: image and ground truth first cut to KITTI's
benchmark size (`kb_crop`: the bottom 352 rows, the middle 1216 columns; the toolbox's KBCrop on the image
before predicting, `eval_kb_crop` on the ground truth), then `garg` of that 352 x 1216 map.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinokit.data.images import plain_path
from dinokit.errors import DinokitError
from dinokit.eval.common import Backbone
from dinokit.eval.dense import (
    UNREADABLE,
    clear_results,
    head_outputs,
    pair_key,
    picture_outputs,
    read_depth,
    read_mask,
    read_pairs,
)
from dinokit.eval.metrics import (
    DEPTH_METRICS,
    confusion_matrix,
    depth_metrics,
    mean_class_accuracy,
    mean_depth_errors,
    segmentation_scores,
)
from dinokit.eval.visualize import colour_depth, colour_mask, save_panel
from dinokit.io import write_json
from dinokit.models.hub import released_head

IGNORE = 255  # mmseg's ignore index (VOC2012's boundary pixels, ADE20K's "other" after reduce_zero_label)
NYU_EIGEN_CROP = (45, 471, 41, 601)  # rows y1:y2, columns x1:x2 of NYU's 480 x 640 maps (the toolbox's eigen_crop)
CROPS = ("auto", "none", "eigen", "garg", "kb_garg")  # auto: the dataset's (NYU eigen, KITTI kb_garg), else none
DATASET_CROPS = {"nyu": "eigen", "kitti": "kb_garg"}  # the released configs' (eigen_crop; KBCrop + garg_crop)
KB_CROP = (352, 1216)  # KITTI's benchmark size: the toolbox's KBCrop (image) and eval_kb_crop (ground truth)


# ---------------------------------------------------------------------------------------- conventions
def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """mmseg's `reduce_zero_label`: label 0 ("other" in ADE20K) -> 255 (ignored), k -> k - 1, 255 stays 255."""
    out = mask.astype(np.int64) - 1
    out[(mask == 0) | (mask == IGNORE)] = IGNORE
    return out


def kb_crop(array: np.ndarray) -> np.ndarray:
    """The bottom 352 rows and middle 1216 columns (`KB_CROP`) of an (H, W, ...) array, as the toolbox's KBCrop:
    top = H - 352, left = int((W - 1216) / 2). A smaller array is refused."""
    height, width = KB_CROP
    if array.shape[0] < height or array.shape[1] < width:
        raise DinokitError(
            f"crop=kb_garg cuts images and depth maps to KITTI's benchmark size {height} x {width}; one of "
            f"{array.shape[0]} x {array.shape[1]} is smaller: pass crop=garg (KITTI's crop of the map as given)"
        )
    top, left = array.shape[0] - height, int((array.shape[1] - width) / 2)
    return array[top : top + height, left : left + width]


def eval_crop(shape: tuple[int, int], crop: str) -> np.ndarray:
    """(H, W) bool: the pixels the toolbox's evaluation crop keeps (all for "none"). "eigen" is NYU's crop of
    a 480 x 640 map (other sizes are refused), "garg" KITTI's fractions of the map's height and width;
    "kb_garg" is "garg" of a map already cut by `kb_crop`."""
    height, width = shape
    keep = np.zeros(shape, dtype=bool)
    if crop == "none":
        keep[:] = True
    elif crop == "eigen":
        if shape != (480, 640):
            raise DinokitError(
                f"crop=eigen is NYU Depth v2's evaluation crop of its 480 x 640 depth maps; a map of {height} x "
                f"{width} has none: pass crop=none (or garg, KITTI's crop by fractions of the size)"
            )
        y1, y2, x1, x2 = NYU_EIGEN_CROP
        keep[y1:y2, x1:x2] = True
    elif crop in ("garg", "kb_garg"):
        keep[int(0.40810811 * height) : int(0.99189189 * height), int(0.03594771 * width) : int(0.96405229 * width)] = (
            True
        )
    else:
        raise DinokitError(f"crop must be one of {', '.join(CROPS[1:])}, got {crop!r}")
    return keep


# ------------------------------------------------------------------------------------------ the head
def check_head_task(head: str, task: str) -> None:
    """Refuse, before any work, a released name or a dinokit head file of the other dense task, naming the
    eval command that scores it."""
    from dinokit.eval.heads import is_released_head, load_head_file

    name = released_head(head)
    other = None
    if name is not None and name.task != task:
        other = name.task
    elif not Path(head).expanduser().is_dir() and not is_released_head(head, task):
        other = load_head_file(head)[1].get("task")
        other = None if other == task else other
    if other in ("segmentation", "depth"):
        raise DinokitError(f"{head} is a {other} head, not a {task} head: score it with `dinokit eval {other}`")
    if other is not None:
        raise DinokitError(f"{head} is a {other} head, not a {task} head: apply it with `dinokit predict {other}`")


def refuse_trained_head_in_out(out_dir: Path, task: str) -> None:
    """A score's out folder must not hold a trained head (`eval <task>` without head=): the rerun's clearing
    would remove it, though scoring writes none back."""
    trained = out_dir / f"{task}_head.safetensors"
    if trained.exists():
        raise DinokitError(
            f"out={out_dir} holds a trained head ({trained.name}) that scoring into it would remove: "
            "choose another out folder"
        )


@dataclass
class HeadRun:
    """A head ready to predict images as `predict` does, and what its scores' protocol records.
    predictions(paths) yields (index into paths, RGB array, prediction at the image's size) per readable
    image, appending the indices of unreadable ones to bad_images."""

    predictions: Callable[[list[Path]], Iterator[tuple[int, np.ndarray, np.ndarray]]]
    bad_images: list[int]
    backbone: Backbone
    record: dict  # the head, its kind and the settings applied
    transform: object  # a dinokit head's torchvision transform, or a description (released heads)
    image_size: int | None
    dataset: str | None  # a released head's dataset (ade20k, voc2012, nyu, kitti) where its name says it
    facts: dict  # segmentation: num_classes, classes, ignore_index; depth: min_depth, max_depth, depth_scale,
    # top_included (gt <= max_depth scored, as the training probe; the toolbox scores gt < max_depth)


def segmentation_run(
    head: str,
    model: str | None,
    scales: list[float] | None,
    flip: bool | None,
    image_size: int | None,
    batch_size: int,
    num_workers: int,
    device: str,
    precision: str,
) -> HeadRun:
    """A released segmentation head (`segment_image` with its scoring settings: an ms head's default ratios
    are the configs' 5) or a dinokit head file (`dense.head_outputs`, classes as `predict_classes`),
    predicting (H, W) class indices."""
    from dinokit.eval.common import make_transform
    from dinokit.eval.heads import backbone_for_head, is_released_head
    from dinokit.eval.segmentation import load_segmentation_head, predict_classes, refuse_released_settings
    from dinokit.runtime import resolve_device

    bad: list[int] = []
    if is_released_head(head, "segmentation"):
        from dinokit.eval.released_segmentation import check_settings, load_released_segmentation_head, view_scales

        check_settings(scales, flip, image_size, batch_size, precision)  # before any download
        released = load_released_segmentation_head(head, model, device)
        settings = released.settings(scales, flip, image_size, batch_size, precision, scoring=True)
        name = released_head(head)
        dataset = name.dataset if name is not None else None
        record = {
            "head": str(released.path),
            "kind": f"released DINOv2 {released.kind} head ({dataset or 'dataset unnamed'})",
            "scales": list(settings.scales),
            "flip": settings.flip,
            "window": settings.crop,
            "stride": settings.stride,
        }
        long_side, short_side = view_scales(settings.image_size, (1.0,), settings.long_side)[0]
        transform = (
            f"aspect-keeping resize to ({long_side}, {short_side}) x each of scales, "
            f"slide windows {settings.crop} / {settings.stride}, ImageNet mean / std on 0-255"
        )
        facts = {"num_classes": len(released.head.conv.bias), "classes": released.classes, "ignore_index": IGNORE}
        return HeadRun(
            partial(picture_outputs, predict=partial(released.segment, settings=settings), bad=bad, desc="score"),
            bad,
            released.backbone,
            record,
            transform,
            settings.image_size,
            dataset,
            facts,
        )
    refuse_released_settings(head, scales, flip, image_size)
    net, meta = load_segmentation_head(head)
    backbone = backbone_for_head(meta, model, device, Path(head))
    net.to(resolve_device(device))
    ignore_index = meta.get("ignore_index", IGNORE)

    def predictions(paths: list[Path]):
        outputs = head_outputs(net, meta, backbone, paths, batch_size, num_workers, precision, bad)
        return ((i, rgb, predict_classes(logits, ignore_index).numpy()) for i, rgb, logits in outputs)

    record = {"head": str(Path(head).expanduser()), "kind": "dinokit head file (eval segmentation)"}
    transform = make_transform(meta["image_size"], "resize", meta.get("reduced_decode", False))
    facts = {"num_classes": meta["num_classes"], "classes": None, "ignore_index": ignore_index}
    return HeadRun(predictions, bad, backbone, record, transform, meta["image_size"], None, facts)


def depth_run(
    head: str,
    model: str | None,
    max_depth: float | None,
    batch_size: int,
    num_workers: int,
    device: str,
    precision: str,
    cut: bool = False,
) -> HeadRun:
    """A released depth head (its `ReleasedDepther`) or a dinokit head file (`dense.head_outputs`, clamped to
    its range as predict depth clamps it), predicting (H, W) metres; with `cut`, of each image's `kb_crop`
    (released heads only), the RGB array yielded cut too."""
    from dinokit.eval.common import make_transform
    from dinokit.eval.depth import load_depth_head, png_depth_scale, refuse_max_depth
    from dinokit.eval.heads import backbone_for_head, is_released_head
    from dinokit.runtime import resolve_device

    bad: list[int] = []
    if is_released_head(head, "depth"):
        from dinokit.eval.released_depth import load_released_depth_head

        depther = load_released_depth_head(head, model, device, max_depth, precision, flip=True)
        low, high = depther.min_depth, depther.max_depth
        name = released_head(head)
        dataset = name.dataset if name is not None else None
        kind = name.kind if name is not None else type(depther.head).__name__
        record = {
            "head": str(head),
            "kind": f"released DINOv2 depth head ({dataset or 'dataset unnamed'}, {kind})",
            "blocks": list(depther.blocks),
            "flip": depther.flip,
        }
        transform = (
            "each image whole at its size, ImageNet mean / std, zero-padded to a patch multiple; the depth "
            "averaged with the mirror image's (the released configs' flip=True)"
        )
        scale = {"nyu": 1000.0, "kitti": 256.0}.get(dataset) or png_depth_scale(high)
        facts = {"min_depth": low, "max_depth": high, "depth_scale": scale, "top_included": False}  # the toolbox's

        def cut_predictions(paths: list[Path]):
            def predict(picture: Image.Image) -> np.ndarray:
                return depther.predict(Image.fromarray(kb_crop(np.asarray(picture))))

            return ((i, kb_crop(rgb), pred) for i, rgb, pred in picture_outputs(paths, predict, bad, "score"))

        return HeadRun(
            cut_predictions if cut else partial(picture_outputs, predict=depther.predict, bad=bad, desc="score"),
            bad,
            depther.loaded,
            record,
            transform,
            None,
            dataset,
            facts,
        )
    refuse_max_depth(max_depth)
    if cut:
        raise DinokitError(
            "crop=kb_garg cuts the images before a released DINOv2 head predicts them; a dinokit head file predicts "
            "whole images: pass crop=garg (or cut the images and depth maps to 352 x 1216 yourself)"
        )
    net, meta = load_depth_head(head)
    backbone = backbone_for_head(meta, model, device, Path(head))
    net.to(resolve_device(device))
    low, high = meta["min_depth"], meta["max_depth"]

    def predictions(paths: list[Path]):
        outputs = head_outputs(net, meta, backbone, paths, batch_size, num_workers, precision, bad)
        return ((i, rgb, pred[0].clamp(low, high).numpy()) for i, rgb, pred in outputs)

    record = {"head": str(Path(head).expanduser()), "kind": "dinokit head file (eval depth)"}
    transform = make_transform(meta["image_size"], "resize", meta.get("reduced_decode", False))
    facts = {
        "min_depth": low,
        "max_depth": high,
        "depth_scale": meta["depth_scale"],
        "top_included": True,
    }  # as trained
    return HeadRun(predictions, bad, backbone, record, transform, meta["image_size"], None, facts)


# ------------------------------------------------------------------------------------------- the pass
def read_targets_once(paths: list[Path], read, check) -> tuple[list[int], int]:
    """(indices of the readable targets, how many were unreadable): each target read once before any
    prediction, `check(path, target)` raising DinokitError for one the scores cannot use."""
    readable, bad = [], []
    for i, path in enumerate(paths):
        try:
            target = read(path)
        except UNREADABLE as err:
            bad.append((path, getattr(err, "reason", None) or f"{type(err).__name__}: {err}"))
            continue
        check(path, target)
        readable.append(i)
    if not readable:
        raise DinokitError(f"none of the {len(paths)} target files could be read, e.g. {bad[0][0]} ({bad[0][1]})")
    if bad:
        print(f"skipped {len(bad)} unreadable target file(s), e.g. {bad[0][0]} ({bad[0][1]})")
    return readable, len(bad)


def score_pairs(
    run: HeadRun, val: str, targets: tuple[str, tuple[str, ...]], read, check, score, panel, out_dir: Path, count: int
) -> tuple[int, list[str], int]:
    """Predict every image of `val` whose target (`targets`: folder name and extensions) is readable and
    call score(prediction, target) for each pair of the same size; the first `count` pairs' panel(RGB,
    target, prediction) tiles are saved as out/examples/<name>.png. An earlier result in out_dir is
    cleared first (`dense.clear_results`). Returns (pairs scored, example paths, files skipped)."""
    images, paths = read_pairs(val, *targets)
    readable, bad_targets = read_targets_once(paths, read, check)
    clear_results(out_dir, "segmentation" if targets[0] == "masks" else "depth")
    images_dir = plain_path(Path(val).expanduser()) / "images"  # as read_pairs spells the image paths
    kept = [images[i] for i in readable]
    skipped, examples, scored = [], [], 0
    for k, rgb, pred in run.predictions(kept):
        path = paths[readable[k]]
        target = read(path)
        if target.shape != pred.shape:
            skipped.append(f"{path}: {target.shape[0]}x{target.shape[1]} for a {pred.shape[0]}x{pred.shape[1]} image")
            continue
        score(pred, target)
        scored += 1
        if len(examples) < count:
            example = out_dir / "examples" / f"{pair_key(kept[k], images_dir)}.png"
            save_panel(example, panel(rgb, target, pred))
            examples.append(str(example))
    skipped += [f"{kept[i]} (unreadable image)" for i in run.bad_images]
    if skipped:
        print(f"{val}: skipped {len(skipped)} pair(s), unreadable or of another size than the image, e.g. {skipped[0]}")
    if scored == 0:
        raise DinokitError(f"no image of {val} could be scored (unreadable, or targets of other sizes): {skipped[0]}")
    return scored, examples, bad_targets + len(skipped)


# -------------------------------------------------------------------------------------- segmentation
def score_segmentation(
    head: str,
    val: str,
    out_dir: Path,
    model: str | None,
    reduce_zero: bool | None,
    ignore_index: int | None,
    scales: list[float] | None,
    flip: bool | None,
    image_size: int | None,
    num_examples: int,
    batch_size: int,
    num_workers: int,
    device: str,
    precision: str,
) -> dict:
    """`eval segmentation head=...`: the head's mIoU, aAcc, mAcc and per-class IoU on `val`, with panels in
    out/examples/; returns the result written to out/segmentation.json (see eval_segmentation)."""
    from dinokit.eval.common import protocol_record
    from dinokit.eval.segmentation import MASK_EXTS

    check_head_task(head, "segmentation")
    refuse_trained_head_in_out(out_dir, "segmentation")
    read_pairs(val, "masks", MASK_EXTS)  # a val without masks/ fails before any download
    run = segmentation_run(head, model, scales, flip, image_size, batch_size, num_workers, device, precision)
    num_classes, classes = run.facts["num_classes"], run.facts["classes"]
    reduce_zero = run.dataset == "ade20k" if reduce_zero is None else reduce_zero
    ignore_index = run.facts["ignore_index"] if ignore_index is None else ignore_index

    def read(path: Path) -> np.ndarray:
        mask = read_mask(path)
        return reduce_zero_label(mask) if reduce_zero else mask

    def check(path: Path, truth: np.ndarray) -> None:
        labelled = truth[truth != ignore_index]
        if labelled.size and labelled.max() >= num_classes:
            hint = (
                ": ADE20K annotations (0 = other, 1..150) need reduce_zero_label=true"
                if not reduce_zero and labelled.max() == num_classes
                else f" (check ignore_index={ignore_index} and reduce_zero_label={str(reduce_zero).lower()})"
            )
            raise DinokitError(
                f"{path} holds class {int(labelled.max())}, but the head predicts {num_classes} classes "
                f"(0..{num_classes - 1}){hint}"
            )

    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def score(pred: np.ndarray, truth: np.ndarray) -> None:
        confusion.add_(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), num_classes, ignore_index))

    def panel(rgb: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> list[np.ndarray]:
        return [rgb, colour_mask(truth, num_classes, ignore_index), colour_mask(pred, num_classes)]

    scored, examples, bad_files = score_pairs(
        run, val, ("masks", MASK_EXTS), read, check, score, panel, out_dir, num_examples
    )
    scores = segmentation_scores(confusion, ignore_index)
    protocol = protocol_record(
        run.backbone,
        run.transform,
        run.image_size,
        precision,
        **run.record,
        metric="mmseg: intersection and union per class over the whole split, mIoU over the classes present "
        "(union > 0), aAcc = correct / labelled pixels, mAcc = mean per-class accuracy; each image at its size",
        reduce_zero_label=reduce_zero,
        ignore_index=ignore_index,
        num_classes=num_classes,
        val=str(val),
        val_images=scored,
        val_bad_files=bad_files,
    )
    result = {
        "miou": scores["miou"],
        "pixel_accuracy": scores["pixel_accuracy"],
        "mean_accuracy": mean_class_accuracy(confusion, ignore_index),
        "iou_per_class": scores["iou"],
        "classes": classes,
        "examples": examples,
        "protocol": protocol,
    }
    write_json(out_dir / "segmentation.json", result)
    print(f"{run.record['kind']} {run.record['head']} on {run.backbone.description}: {scored} images of {val}")
    print(f"{'':<10} {'mIoU':>7} {'aAcc':>7} {'mAcc':>7}")
    print(f"{'head':<10} {result['miou']:>7.2f} {result['pixel_accuracy']:>7.2f} {result['mean_accuracy']:>7.2f}")
    if num_classes <= 30:
        for c, iou in enumerate(scores["iou"]):
            label = classes[c] if classes else f"class {c}"
            print(f"  {c:>3} {label:<24} {'-' if iou is None else f'{iou:.2f}':>7}")
    else:
        print(f"per-class IoU ({num_classes} classes{', named' if classes else ''}): {out_dir / 'segmentation.json'}")
    return result


# --------------------------------------------------------------------------------------------- depth
def score_depth(
    head: str,
    val: str,
    out_dir: Path,
    model: str | None,
    min_depth: float,
    max_depth: float | None,
    depth_scale: float | None,
    crop: str,
    num_examples: int,
    batch_size: int,
    num_workers: int,
    device: str,
    precision: str,
) -> dict:
    """`eval depth head=...`: the head's depth errors on `val` (DEPTH_METRICS, per image then averaged), with
    panels in out/examples/; returns the result written to out/depth.json (see eval_depth)."""
    from dinokit.eval.common import protocol_record
    from dinokit.eval.depth import DEPTH_EXTS

    check_head_task(head, "depth")
    refuse_trained_head_in_out(out_dir, "depth")
    if crop not in CROPS:
        raise DinokitError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if depth_scale is not None and not depth_scale > 0:
        raise DinokitError(f"depth_scale must be > 0 (integer depth-image units per metre), got {depth_scale}")
    read_pairs(val, "depth", DEPTH_EXTS)  # a val without depth/ fails before any download
    if crop == "auto":  # a released head's dataset, as its name says it
        from dinokit.eval.heads import is_released_head

        name = released_head(head) if is_released_head(head, "depth") else None
        crop = DATASET_CROPS.get(name.dataset if name is not None else None, "none")
    run = depth_run(head, model, max_depth, batch_size, num_workers, device, precision, cut=crop == "kb_garg")
    low, high, top_included = run.facts["min_depth"], run.facts["max_depth"], run.facts["top_included"]
    depth_scale = depth_scale or run.facts["depth_scale"]

    def read(path: Path) -> np.ndarray:
        gt = read_depth(path, depth_scale)
        return kb_crop(gt) if crop == "kb_garg" else gt

    def check(path: Path, gt: np.ndarray) -> None:
        try:
            eval_crop(gt.shape, crop)
        except DinokitError as e:
            raise DinokitError(f"{path}: {e}") from None

    per_image = []

    def valid(gt: np.ndarray) -> np.ndarray:
        below_top = gt <= high if top_included else gt < high
        return (gt > min_depth) & below_top & eval_crop(gt.shape, crop)

    def score(pred: np.ndarray, gt: np.ndarray) -> None:
        per_image.append(depth_metrics(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(valid(gt))))

    def panel(rgb: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> list[np.ndarray]:
        return [rgb, colour_depth(gt, low, high, valid(gt)), colour_depth(pred, low, high)]

    scored, examples, bad_files = score_pairs(
        run, val, ("depth", DEPTH_EXTS), read, check, score, panel, out_dir, num_examples
    )
    errors = mean_depth_errors(per_image, DEPTH_METRICS)
    if errors["images"] < scored:
        print(f"{scored - errors['images']} image(s) without a valid pixel in range and crop, left out")
    protocol = protocol_record(
        run.backbone,
        run.transform,
        run.image_size,
        precision,
        **run.record,
        range=[low, high],
        metric=f"per image over {min_depth} < gt {'<=' if top_included else '<'} {high} m inside crop={crop} (the "
        "Monocular-Depth-Estimation-Toolbox's metrics and crops), averaged over images; each image at its size",
        crop=crop,
        depth_scale=depth_scale,
        val=str(val),
        val_images=scored,
        val_bad_files=bad_files,
    )
    result = {**errors, "examples": examples, "protocol": protocol}
    write_json(out_dir / "depth.json", result)
    print(f"{run.record['kind']} {run.record['head']} on {run.backbone.description}: {scored} images of {val}")
    print(f"range {low:g}-{high:g} m, crop={crop}, PNG units 1/{depth_scale:g} m")
    print(" ".join(f"{k:>9}" for k in DEPTH_METRICS))
    print(" ".join(f"{errors[k]:>9.4f}" for k in DEPTH_METRICS))
    return result
