"""Patch features as colours: the first three principal components as RGB (the DINOv2 paper's figures).

One PCA is fitted on the patches of all images together, so that matching parts of different images
get the same colours. With `foreground_threshold`, the paper's two-step recipe: the first component
of a PCA on all patches, scaled to [0, 1], separates foreground (above the threshold) from
background; a second PCA on the foreground patches alone gives the colours, background black.
The sign of a principal component is arbitrary; the first one is oriented so that the image border
(mostly background in object photos) lies on the low side.
"""

import numpy as np
import torch

from dinokit.errors import DinokitError
from dinokit.maps.attention import model_batch
from dinokit.maps.render import normalise_01
from dinokit.models import VisionTransformer


@torch.inference_mode()
def patch_features(model: VisionTransformer, images: list[torch.Tensor]) -> list[np.ndarray]:
    """Normed last-block patch tokens of each image (3, H, W) as an (H/p, W/p, D) array (sizes may differ);
    the images move to the model's device, the arrays come back on the CPU."""
    out = []
    for image in images:
        x = model_batch(model, image)
        h, w = model.grid_size(*x.shape[-2:])
        tokens = model.forward_features(x)["x_norm_patchtokens"][0]
        out.append(tokens.float().cpu().reshape(h, w, -1).numpy())
    return out


def pca_rgb(features: list[np.ndarray], foreground_threshold: float | None = None) -> dict:
    """Joint PCA of the patch features of several images, (h_i, w_i, D) each.

    Returns rgb: [(h_i, w_i, 3) floats in [0, 1]] (black background when thresholding),
    foreground: [(h_i, w_i) bool], first_component: [(h_i, w_i) in [0, 1]] (when thresholding),
    components (3, D) orthonormal, explained_variance_ratio (3,) descending.
    """
    shapes = [f.shape[:2] for f in features]
    x = np.concatenate([f.reshape(-1, f.shape[-1]) for f in features]).astype(np.float64)
    if len(x) < 3:
        raise DinokitError(
            f"PCA colours need at least 3 patches, the images give {len(x)} ({shapes[0][0]}x{shapes[0][1]} "
            "patch grid): use a larger image_size"
        )
    from sklearn.decomposition import PCA  # 0.9 s to import: only here, not for every maps command

    result = {}
    foreground = np.ones(len(x), dtype=bool)
    if foreground_threshold is not None:
        first = normalise_01(PCA(n_components=1, svd_solver="full").fit_transform(x)[:, 0])
        if first[border_patches(shapes)].mean() > first.mean():  # orient: border = background = low
            first = 1.0 - first
        foreground = first > foreground_threshold
        result["first_component"] = split(first, shapes)
    # the colours come from the foreground patches (all images jointly); too few for 3 components: from all
    fit = foreground if foreground.sum() >= 3 else np.ones(len(x), dtype=bool)
    pca = PCA(n_components=3, svd_solver="full").fit(x[fit])
    coords = pca.transform(x)
    rgb = np.zeros_like(coords)
    for c in range(3):  # scale each component over the patches it was fitted on
        lo, hi = coords[fit, c].min(), coords[fit, c].max()
        rgb[:, c] = np.clip((coords[:, c] - lo) / (hi - lo), 0, 1) if hi > lo else 0.0
    rgb[~foreground] = 0.0
    result.update(
        rgb=split(rgb, shapes),
        foreground=split(foreground, shapes),
        components=pca.components_,
        explained_variance_ratio=pca.explained_variance_ratio_,
    )
    return result


def border_patches(shapes: list[tuple[int, int]]) -> np.ndarray:
    """Bool over the concatenated patches of all images: True on each image's outer ring of patches."""
    rings = []
    for h, w in shapes:
        ring = np.zeros((h, w), dtype=bool)
        ring[[0, -1], :] = True
        ring[:, [0, -1]] = True
        rings.append(ring.ravel())
    return np.concatenate(rings)


def split(values: np.ndarray, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Concatenated per-patch values -> one (h, w, ...) array per image."""
    out, start = [], 0
    for h, w in shapes:
        out.append(values[start : start + h * w].reshape(h, w, *values.shape[1:]))
        start += h * w
    return out
