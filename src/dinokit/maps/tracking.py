"""Video object segmentation by label propagation of patch features (DINO's DAVIS-2017 protocol).

DINO v1 (`eval_video_segmentation.py`, `label_propagation`) tracks the objects of a video's first-frame
mask without any training: for each later frame t, every target patch compares its L2-normalised
last-layer feature with the patches of a context (the first frame and the `n_last_frames` frames
before t, 7 by default), with affinity exp(cos / 0.1). Only context patches within
`size_mask_neighborhood` patches (12 by default; a square window, |row - row'| and |col - col'| at
most that, 0 = whole frame) count. Per target patch the `topk` (5) largest affinities over all context
patches are kept (as DINO: every affinity >= the k-th largest, so ties may keep a few more), normalised
to sum 1, and the target's soft segmentation is their weighted sum of the context patches' soft
segmentations. The first frame's is one-hot per object, from its mask resized (nearest, as PIL) to
the patch grid (DAVIS's void index 255 read as background, as davis2017-evaluation reads its masks);
frame t's soft segmentation joins the context queue. The output label map: the soft segmentation
upsampled bilinearly by the patch size (to the model input), each object's channel min-max scaled
to [0, 1] (DINO's `norm_mask`), the argmax per pixel, resized (nearest) to the frame.

Arrays only (no files): `propagate_labels` is one step, `track` the sequence.
"""

from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

VOID = 255  # DAVIS marks void (unlabelled) pixels 255: background for tracking and scoring, never an object
TEMPERATURE = 0.1  # affinity = exp(cos / TEMPERATURE), DINO's value
CHUNK_ELEMENTS = 2**24  # affinities held at once: target patches per chunk x context patches


def propagate_labels(
    target: torch.Tensor,
    context_features: torch.Tensor,
    context_labels: torch.Tensor,
    topk: int = 5,
    size_mask_neighborhood: int = 12,
) -> torch.Tensor:
    """One label-propagation step: the soft segmentation (C, h, w) of a target frame.

    target: (h, w, D) patch features of the target frame; context_features: (T, h, w, D) those of the
    T context frames (both L2-normalised here); context_labels: (T, C, h, w) their soft segmentations
    (C = background + objects). Target patches are taken in chunks, so memory stays at about
    CHUNK_ELEMENTS affinities whatever the frame size (DINO holds all T (hw)^2 of them).
    """
    h, w, dim = target.shape
    frames = context_features.shape[0]
    queries = F.normalize(target.reshape(h * w, dim).float(), dim=1)
    keys = F.normalize(context_features.reshape(frames * h * w, dim).float(), dim=1)
    labels = context_labels.float().permute(0, 2, 3, 1).reshape(frames * h * w, -1)  # (T h w, C)
    k = min(topk, frames * h * w)
    rows, cols = torch.div(torch.arange(h * w), w, rounding_mode="floor"), torch.arange(h * w) % w
    rows, cols = rows.to(queries.device), cols.to(queries.device)
    out = torch.empty(h * w, labels.shape[1], dtype=torch.float32, device=queries.device)
    step = max(1, CHUNK_ELEMENTS // (frames * h * w))
    for start in range(0, h * w, step):
        part = slice(start, start + step)
        affinity = torch.exp(queries[part] @ keys.T / TEMPERATURE)  # (chunk, T h w)
        if size_mask_neighborhood > 0:
            near = ((rows[part, None] - rows[None]).abs() <= size_mask_neighborhood) & (
                (cols[part, None] - cols[None]).abs() <= size_mask_neighborhood
            )  # (chunk, h w): the same window in every context frame
            affinity = affinity * near.repeat(1, frames)
        kth = affinity.topk(k, dim=1).values[:, -1:]
        affinity = torch.where(affinity >= kth, affinity, 0.0)
        out[part] = (affinity / affinity.sum(dim=1, keepdim=True)) @ labels
    return out.T.reshape(-1, h, w)


def one_hot_at_grid(mask: np.ndarray, values: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) float one-hot of a (H, W) index mask resized (nearest, PIL's rule) to the patch
    `grid` (h, w); channel c marks the pixels of index values[c]."""
    small = np.asarray(Image.fromarray(mask.astype(np.int32)).resize(grid[::-1], Image.Resampling.NEAREST))
    return torch.from_numpy(np.stack([small == v for v in values]).astype(np.float32))


def labels_to_mask(
    soft: torch.Tensor, values: list[int], patch_size: int, size: tuple[int, int], dtype=np.uint8
) -> np.ndarray:
    """(H, W) index mask from a soft segmentation (C, h, w): upsampled bilinearly to (h p, w p), each
    channel with a range min-max scaled to [0, 1] (DINO's norm_mask; a constant channel is left as is,
    where DINO would divide by 0), argmax per pixel as values[c], resized (nearest) to `size` (H, W)."""
    h, w = soft.shape[-2:]
    up = F.interpolate(soft[None].float(), size=(h * patch_size, w * patch_size), mode="bilinear", align_corners=False)
    up = up[0]
    low = up.amin(dim=(1, 2), keepdim=True)
    span = up.amax(dim=(1, 2), keepdim=True) - low
    up = torch.where(span > 0, (up - low) / span.clamp_min(1e-30), up)
    index = up.argmax(dim=0).cpu().numpy()
    mask = np.asarray(values, dtype=np.int64)[index].astype(np.int32)
    if mask.shape != tuple(size):
        mask = np.asarray(Image.fromarray(mask).resize(size[::-1], Image.Resampling.NEAREST))
    return mask.astype(dtype)


def object_values(mask: np.ndarray) -> list[int]:
    """The object indices of a first-frame mask: its values but 0 (background) and 255 (DAVIS's void),
    ascending (DAVIS: 1..N)."""
    return [int(v) for v in np.unique(mask) if v not in (0, VOID)]


def track(
    features: Iterable[torch.Tensor],
    first_mask: np.ndarray,
    patch_size: int,
    n_last_frames: int = 7,
    size_mask_neighborhood: int = 12,
    topk: int = 5,
) -> Iterator[np.ndarray]:
    """The (H, W) index mask of every frame of a video, its first mask first.

    features: per frame (first included) its patch features (h, w, D), e.g. a generator computing them
    one frame at a time; only that frame's features and the context queue (first frame + the last
    `n_last_frames`, with their (C, h, w) soft segmentations) are held. first_mask: (H, W) indices of the
    first frame (0 = background, 255 = void, read as background, others = objects), at the frames' pixel
    size; `patch_size` of the model (h p x w p is its input). Masks keep first_mask's indices and dtype;
    the first is first_mask as given.
    """
    values = [0, *object_values(first_mask)]
    frames = iter(features)
    first = next(frames)
    labelled = np.where(first_mask == VOID, 0, first_mask)
    first_labels = one_hot_at_grid(labelled, values, first.shape[:2]).to(first.device)
    queue: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=n_last_frames)
    yield first_mask
    for target in frames:
        context = [(first, first_labels), *queue]
        soft = propagate_labels(
            target,
            torch.stack([f for f, _ in context]),
            torch.stack([s for _, s in context]),
            topk=topk,
            size_mask_neighborhood=size_mask_neighborhood,
        )
        if n_last_frames > 0:
            queue.append((target, soft))
        yield labels_to_mask(soft, values, patch_size, first_mask.shape, first_mask.dtype)
