"""Dense-prediction metrics, as mmsegmentation and the monocular-depth toolbox that DINOv2 uses.

Segmentation, accumulated over the whole dataset in one confusion matrix (pixels labelled
`ignore_index` excluded; an `ignore_index` inside 0..C-1 is no class, so it is left out of the mean):
    IoU_c = TP_c / (TP_c + FP_c + FN_c)   mIoU = mean over classes with TP + FP + FN > 0
    pixel accuracy = sum_c TP_c / labelled pixels
Depth, per image over its valid pixels (min_depth < gt <= max_depth), then averaged over images:
    RMSE = sqrt(mean (pred - gt)^2)   AbsRel = mean |pred - gt| / gt   delta1 = mean[max(pred/gt, gt/pred) < 1.25]
"""

import numpy as np
import torch


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


def depth_errors(pred: torch.Tensor, gt: torch.Tensor, min_depth: float, max_depth: float) -> dict | None:
    """{"rmse", "abs_rel", "delta1"} of one image over its valid pixels; None if it has none."""
    valid = (gt > min_depth) & (gt <= max_depth)
    if not valid.any():
        return None
    p, g = pred[valid].double(), gt[valid].double()
    ratio = torch.maximum(p / g, g / p)
    return {
        "rmse": ((p - g) ** 2).mean().sqrt().item(),
        "abs_rel": ((p - g).abs() / g).mean().item(),
        "delta1": 100.0 * (ratio < 1.25).double().mean().item(),
    }


def mean_depth_errors(per_image: list[dict | None]) -> dict:
    """Average of per-image depth errors (images without valid pixels skipped)."""
    rows = [r for r in per_image if r is not None]
    if not rows:
        return {"rmse": float("nan"), "abs_rel": float("nan"), "delta1": float("nan"), "images": 0}
    return {k: float(np.mean([r[k] for r in rows])) for k in ("rmse", "abs_rel", "delta1")} | {"images": len(rows)}
