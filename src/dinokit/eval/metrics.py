"""Dense-prediction metrics, as mmsegmentation and the monocular-depth toolbox that DINOv2 uses.

Segmentation, accumulated over the whole dataset in one confusion matrix (pixels labelled
`ignore_index` excluded; an `ignore_index` inside 0..C-1 is no class, so it is left out of the mean):
    IoU_c = TP_c / (TP_c + FP_c + FN_c)   mIoU = mean over classes with TP + FP + FN > 0
    pixel accuracy = sum_c TP_c / labelled pixels
Depth, per image over its valid pixels (min_depth < gt <= max_depth), then averaged over images:
    RMSE = sqrt(mean (pred - gt)^2)   AbsRel = mean |pred - gt| / gt   delta1 = mean[max(pred/gt, gt/pred) < 1.25]
    and the rest of the Monocular-Depth-Estimation-Toolbox's (depth/core/evaluation/metrics.py) that the DINOv2
    depth evaluation used: delta2, delta3 (< 1.25^2, 1.25^3; deltas in %, the toolbox's a1-a3 are fractions),
    SqRel = mean (pred - gt)^2 / gt, RMSE log = sqrt(mean (log gt - log pred)^2), log10 = mean |log10 gt -
    log10 pred|, SILog = 100 sqrt(mean e^2 - (mean e)^2) with e = log pred - log gt
Video object segmentation, as DAVIS-2017's semi-supervised benchmark (davis2017-evaluation: db_eval_iou,
db_eval_boundary), per object k of the first frame over the frames but the first and last:
    J = |pred_k & gt_k| / |pred_k | gt_k| (1 where both are empty)
    F = 2 P R / (P + R) of the 1-px boundaries, a boundary pixel matching within ceil(0.008 x the image
        diagonal) px of the other's (a disk); P = 1, R = 0 without a predicted boundary, and so on
    per object (davis2017-evaluation's db_statistics): mean over its frames; recall = the share of frames
        scoring > 0.5; decay = mean of the first of 4 frame bins minus that of the last (the bins' edges
        round(linspace(1, n, 5)) - 1, each bin from its edge to the next one included)
    J-mean, F-mean (and recall, decay): mean over objects, of one video or of all objects of all videos
        (davis2017-evaluation's global results: an object of a video with 3 weighs as one of a video with
        1); J&F-mean = (J-mean + F-mean) / 2
"""

import math

import numpy as np
import torch
from scipy.ndimage import binary_dilation
from skimage.morphology import disk

from dinokit.maps.tracking import VOID


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor, ignore_index: int | None = None) -> dict:
    """{"miou": %, "pixel_accuracy": %, "iou": [% or None per class]} from a confusion matrix
    (rows = true class). An `ignore_index` in 0..C-1 labels no class: its IoU is None, out of the mean."""
    c = confusion.double()
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    if ignore_index is not None and 0 <= ignore_index < len(tp):
        present[ignore_index] = False
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = c.sum()
    return {
        "miou": 100.0 * iou[present].mean().item() if present.any() else float("nan"),
        "pixel_accuracy": 100.0 * (tp.sum() / total).item() if total > 0 else float("nan"),
        "iou": [None if np.isnan(v) else 100.0 * v for v in iou.tolist()],
    }


def mean_class_accuracy(confusion: torch.Tensor, ignore_index: int | None = None) -> float:
    """mmseg's mAcc in %: per true class, the share of its pixels predicted as it, averaged over the classes
    with labelled pixels (an `ignore_index` in 0..C-1 left out, as in segmentation_scores)."""
    c = confusion.double()
    labelled = c.sum(1)
    present = labelled > 0
    if ignore_index is not None and 0 <= ignore_index < len(labelled):
        present[ignore_index] = False
    return 100.0 * (c.diag()[present] / labelled[present]).mean().item() if present.any() else float("nan")


def depth_errors(pred: torch.Tensor, gt: torch.Tensor, min_depth: float, max_depth: float) -> dict | None:
    """{"rmse", "abs_rel", "delta1"} of one image over its valid pixels; None if it has none."""
    valid = (gt > min_depth) & (gt <= max_depth)
    errors = depth_metrics(pred, gt, valid)
    return None if errors is None else {k: errors[k] for k in ("rmse", "abs_rel", "delta1")}


DEPTH_METRICS = ("rmse", "abs_rel", "delta1", "delta2", "delta3", "sq_rel", "rmse_log", "log10", "silog")


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> dict | None:
    """Every DEPTH_METRICS value of one image over the pixels where `valid` (H, W) is true (the toolbox's
    `calculate`, in float64); None if there are none. SILog's variance, negative by rounding, counts as 0."""
    if not valid.any():
        return None
    p, g = pred[valid].double(), gt[valid].double()
    ratio = torch.maximum(p / g, g / p)
    log_error = p.log() - g.log()
    variance = (log_error**2).mean() - log_error.mean() ** 2
    return {
        "rmse": ((p - g) ** 2).mean().sqrt().item(),
        "abs_rel": ((p - g).abs() / g).mean().item(),
        "delta1": 100.0 * (ratio < 1.25).double().mean().item(),
        "delta2": 100.0 * (ratio < 1.25**2).double().mean().item(),
        "delta3": 100.0 * (ratio < 1.25**3).double().mean().item(),
        "sq_rel": ((p - g) ** 2 / g).mean().item(),
        "rmse_log": (log_error**2).mean().sqrt().item(),
        "log10": (g.log10() - p.log10()).abs().mean().item(),
        "silog": 100.0 * variance.clamp(min=0).sqrt().item(),
    }


def mean_depth_errors(per_image: list[dict | None], keys: tuple[str, ...] = ("rmse", "abs_rel", "delta1")) -> dict:
    """Average of per-image depth errors `keys` (images without valid pixels skipped), "images": those averaged."""
    rows = [r for r in per_image if r is not None]
    if not rows:
        return dict.fromkeys(keys, float("nan")) | {"images": 0}
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} | {"images": len(rows)}


def jaccard(truth: np.ndarray, pred: np.ndarray) -> float:
    """J of one object in one frame: IoU of two (H, W) bool masks; 1 where both are empty (DAVIS)."""
    union = np.logical_or(truth, pred).sum()
    return 1.0 if union == 0 else float(np.logical_and(truth, pred).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool 1-px boundary of a bool mask, DAVIS's seg2bmap at full size: a pixel differing from
    its east, south or south-east neighbour (the last row: east only; the last column: south only;
    the corner never), i.e. the boundary offset half a pixel towards the origin."""
    seg = np.asarray(mask, dtype=bool)
    east, south, south_east = (np.zeros_like(seg) for _ in range(3))
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    edge = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    edge[-1, :] = seg[-1, :] ^ east[-1, :]
    edge[:, -1] = seg[:, -1] ^ south[:, -1]
    edge[-1, -1] = False
    return edge


def boundary_f(truth: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> float:
    """F of one object in one frame (DAVIS's f_measure): boundary precision and recall of two (H, W)
    bool masks within a tolerance of ceil(bound_th x diagonal) px (bound_th >= 1: that many px)."""
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*np.shape(truth))))
    pred_edge, truth_edge = boundary_map(pred), boundary_map(truth)
    n_pred, n_truth = int(pred_edge.sum()), int(truth_edge.sum())
    if n_pred == 0 or n_truth == 0:  # DAVIS: no boundary on one side is P = 1, R = 0 (or the reverse)
        return 1.0 if n_pred == n_truth else 0.0
    ball = disk(radius).astype(bool)
    precision = (pred_edge & binary_dilation(truth_edge, ball)).sum() / n_pred
    recall = (truth_edge & binary_dilation(pred_edge, ball)).sum() / n_truth
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def frame_jf(pred: np.ndarray, truth: np.ndarray, objects: list[int]) -> tuple[list[float], list[float]]:
    """(J per object, F per object) of one frame: (H, W) index masks, object k = the pixels of index k
    (the truth's 255 counts as background, as DAVIS reads it)."""
    truth = np.where(truth == VOID, 0, truth)  # DAVIS's reader: void is background
    pairs = [(truth == k, pred == k) for k in objects]
    return [jaccard(t, p) for t, p in pairs], [boundary_f(t, p) for t, p in pairs]


def video_jf(per_frame: list, objects: list[int]) -> dict:
    """DAVIS-2017 scores of one video from `frame_jf` of every frame, the first and last included
    (those two are left out of the scores as DAVIS does, and may be None): {"J_mean", "F_mean",
    "J&F_mean", "objects": {k: {"J", "F"}}, "frames_scored"}, shares in [0, 1]."""
    scored = per_frame[1:-1]
    if not scored:
        raise ValueError("DAVIS scores leave out the first and last frames: a video of 3 frames or more is needed")
    j = np.array([frame[0] for frame in scored], dtype=np.float64).reshape(len(scored), len(objects))
    f = np.array([frame[1] for frame in scored], dtype=np.float64).reshape(len(scored), len(objects))
    j_objects, f_objects = j.mean(axis=0), f.mean(axis=0)
    j_mean, f_mean = float(j_objects.mean()), float(f_objects.mean())
    by_object = {}
    for i, k in enumerate(objects):
        (jm, jr, jd), (fm, fr, fd) = davis_statistics(j[:, i]), davis_statistics(f[:, i])
        by_object[str(k)] = {"J": jm, "F": fm, "J_recall": jr, "J_decay": jd, "F_recall": fr, "F_decay": fd}
    return {
        "J_mean": j_mean,
        "F_mean": f_mean,
        "J&F_mean": (j_mean + f_mean) / 2,
        "objects": by_object,
        "frames_scored": len(scored),
    }


def davis_statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame J or F over its n scored frames (davis2017-evaluation's
    db_statistics): recall = share of frames > 0.5; decay = mean of bin 0 - mean of bin 3 of 4 bins with
    edges e = round(linspace(1, n, 5)) - 1, bin i = frames e_i .. e_(i+1) (both included). DAVIS casts the
    edges to uint8, which wraps beyond 256 frames; here they stay exact (equal on every DAVIS video)."""
    values = np.asarray(per_frame, dtype=np.float64)
    edges = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64)
    bins = [values[edges[i] : edges[i + 1] + 1] for i in range(4)]
    return float(values.mean()), float((values > 0.5).mean()), float(bins[0].mean() - bins[3].mean())


GLOBAL_MEASURES = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def davis_global(videos: list[dict]) -> dict:
    """davis2017-evaluation's global results from `video_jf` of each video: every measure of
    GLOBAL_MEASURES averaged over all objects of all videos (not over videos), "objects": their count."""
    objects = [o for video in videos for o in video["objects"].values()]
    if not objects:
        raise ValueError("no video scored: global results need one object or more")

    def mean(key: str) -> float:
        return float(np.mean([o[key] for o in objects]))

    j, f = mean("J"), mean("F")
    values = [(j + f) / 2, j, mean("J_recall"), mean("J_decay"), f, mean("F_recall"), mean("F_decay")]
    return dict(zip(GLOBAL_MEASURES, values, strict=True)) | {"objects": len(objects)}
