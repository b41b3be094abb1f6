"""Zero-shot segmentation from reference masks by patch-feature matching (the seed tutorial's 5.1).

The reference mask picks the reference image's patches (those at least half covered, counting its
labelled pixels only: void ones, e.g. Pascal VOC's 255 borders, are neither object nor background);
their mean feature is the prototype. Each target patch scores its cosine similarity to the prototype;
with several references the scores are averaged. The score map is upsampled (bilinear) to the target's
pixels and thresholded, at a fixed value or at Otsu's threshold (the one that best splits the
scores into two classes, computed exactly on the scores).
"""

import numpy as np
import torch
import torch.nn.functional as F

from dinokit.errors import DinokitError
from dinokit.maps.render import upsample


def patch_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction (h, w) of each patch's labelled pixels that a (H, W) mask of the same image marks as
    object (area averages): mask 1 / True = object, 0 = background, NaN = void (not counted either
    way; a patch of void pixels only has coverage 0)."""
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    known = ~torch.isnan(m)
    both = torch.stack([torch.where(known, m, 0.0), known.float()])[None]
    covered, labelled = F.interpolate(both, size=tuple(grid), mode="area")[0]
    return torch.where(labelled > 0, covered / labelled.clamp_min(1e-12), 0.0).numpy()


def prototype(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean (D,) of the patch features (h, w, D) at least half covered by the pixel `mask` (bool, or
    float with NaN = void; see `patch_coverage`), or, for a mask smaller than any patch, of the most
    covered patches."""
    coverage = patch_coverage(mask, features.shape[:2])
    if coverage.max() <= 0:
        raise DinokitError("the reference mask is empty: it must mark the object (nonzero pixels)")
    chosen = coverage >= min(0.5, coverage.max())
    return features[chosen].mean(axis=0)


def similarity_to(features: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Cosine similarity (h, w) of each patch feature (h, w, D) to one vector (D,)."""
    flat = features.reshape(-1, features.shape[-1])
    cos = flat @ vector / np.maximum(np.linalg.norm(flat, axis=1) * np.linalg.norm(vector), 1e-12)
    return cos.reshape(features.shape[:2])


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold: the split of the sorted values that maximises the between-class variance
    w0 w1 (m0 - m1)^2, returned halfway between the two values at the split. Exact on the values
    (scikit-image's `threshold_otsu` bins them into 256 and can land up to a bin inside a mode)."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v[0] == v[-1]:
        return float(v[0])
    n = len(v)
    k = np.arange(1, n)  # class 0 = the k smallest values
    below = np.cumsum(v)[:-1]
    between = (k / n) * (1 - k / n) * (below / k - (v.sum() - below) / (n - k)) ** 2
    between[v[1:] == v[:-1]] = -1.0  # a split must fall between two different values
    best = int(np.argmax(between))
    return float((v[best] + v[best + 1]) / 2)


def segment_features(
    references: list[tuple[np.ndarray, np.ndarray]],
    target: np.ndarray,
    size: tuple[int, int],
    threshold: float | str = "otsu",
) -> dict:
    """Segment a target from references.

    references: [(patch features (h, w, D), bool mask (H, W) of that reference image), ...].
    target: patch features (h_t, w_t, D). size: the target's pixel size (H_t, W_t).
    Returns similarity (h_t, w_t) averaged over references, score (H_t, W_t) upsampled,
    threshold (the number used) and mask (H_t, W_t) bool = score > threshold.
    """
    if not references:
        raise DinokitError("segmentation needs at least one reference image and mask")
    similarity = np.mean([similarity_to(target, prototype(f, m)) for f, m in references], axis=0)
    score = upsample(similarity, size)
    check_threshold(threshold)
    value = otsu_threshold(score) if threshold == "otsu" else float(threshold)
    return {"similarity": similarity, "score": score, "threshold": value, "mask": score > value}


def check_threshold(threshold: float | str) -> None:
    """A DinokitError unless `threshold` is "otsu" or a cosine in [-1, 1] (50 would leave every mask empty)."""
    if threshold != "otsu" and not (isinstance(threshold, (int, float)) and -1 <= threshold <= 1):
        raise DinokitError(f"threshold must be a cosine between -1 and 1 (e.g. 0.5) or 'otsu', got {threshold!r}")
