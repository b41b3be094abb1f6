"""Batch feature extraction: DataLoader workers decode and resize while the model runs.

The one place where images become features; embedding to disk, evaluation caches and the demo all
call `iter_features` / `extract_features`.
"""

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from dinokit.data.images import ImageFiles, collate_skipping_bad
from dinokit.errors import DinokitError
from dinokit.models.vision_transformer import VisionTransformer
from dinokit.runtime import autocast, device_out_of_memory, free_cached_memory, ignore_stop_signals

# Which features a batch can produce, and their shapes for B images, D dims, R registers, N patches.
FEATURE_KINDS = {
    "cls": "(B, D) normed CLS token",
    "patch_mean": "(B, D) mean of the normed patch tokens",
    "registers": "(B, R, D) normed register tokens",
    "patch_tokens": "(B, N, D) normed patch tokens (the full grid, row-major)",
    "layers": "(B, L, D) CLS of each block in `layers`",
    "layer_patch_tokens": "(B, L, N, D) patch tokens of each block in `layers`",
}
# `layers` and `layer_patch_tokens` come from get_intermediate_layers, normed unless norm=False.


def compute_features(
    model: VisionTransformer,
    images: torch.Tensor,
    which: Sequence[str] = ("cls",),
    layers: Sequence[int] = (),
    norm: bool = True,
) -> dict[str, torch.Tensor]:
    """Features of one batch of images (already on the model's device). `norm` applies the final
    LayerNorm to the per-block kinds (`layers`, `layer_patch_tokens`), as get_intermediate_layers."""
    unknown = set(which) - set(FEATURE_KINDS)
    if unknown:
        raise DinokitError(f"unknown feature kinds {sorted(unknown)}; choose from {', '.join(FEATURE_KINDS)}")
    per_block = {"layers", "layer_patch_tokens"} & set(which)
    final = set(which) - per_block
    out = {}
    pairs = None
    if per_block:
        if not layers:
            raise DinokitError(
                "features 'layers' / 'layer_patch_tokens' need block indices, e.g. layers=[8, 9, 10, 11]"
            )
        pairs = model.get_intermediate_layers(images, n=list(layers), return_class_token=True, norm=norm)
        if "layers" in which:
            out["layers"] = torch.stack([cls for _, cls in pairs], dim=1)
        if "layer_patch_tokens" in which:
            out["layer_patch_tokens"] = torch.stack([patches for patches, _ in pairs], dim=1)
    if final:
        last = None  # the normed last block among the per-block outputs: no second forward
        if pairs is not None and norm and "registers" not in final:
            depth = len(model.blocks)
            blocks = [i % depth for i in layers]
            last = pairs[blocks.index(depth - 1)] if depth - 1 in blocks else None
        if last is not None:
            f = {"x_norm_clstoken": last[1], "x_norm_patchtokens": last[0]}
        else:
            f = model.forward_features(images)
        if "cls" in which:
            out["cls"] = f["x_norm_clstoken"]
        if "patch_mean" in which:
            out["patch_mean"] = f["x_norm_patchtokens"].mean(dim=1)
        if "registers" in which:
            out["registers"] = f["x_norm_regtokens"]
        if "patch_tokens" in which:
            out["patch_tokens"] = f["x_norm_patchtokens"]
    return {k: v.float() for k, v in out.items()}


def compute_features_fitting(
    model: VisionTransformer, images: torch.Tensor, limit: int, *args
) -> tuple[dict[str, torch.Tensor], int]:
    """`compute_features` of images (B, 3, H, W) run `limit` at a time; a run the device has no memory
    for is halved (and again, down to one image, whose out-of-memory error is raised) after its cached
    memory is freed. Returns ({kind: (B, ...)}, the images per run that fitted: `limit` or fewer).
    `args`: compute_features' which, layers, norm. A sharded (FSDP) model is not split: its forward is a
    collective that every process must run alike."""
    sharded = hasattr(next(model.parameters()), "to_local")
    parts = []
    start = 0
    while start < len(images):
        n = min(limit, len(images) - start)
        try:
            feats = compute_features(model, images[start : start + n], *args)
        except RuntimeError as e:
            if n == 1 or sharded or not device_out_of_memory(e):
                raise
            feats = None  # the error, and the tensors its traceback holds, go when this block ends
        if feats is None:
            limit = (n + 1) // 2
            free_cached_memory(images.device)
            continue
        parts.append(feats)
        start += n
    if len(parts) == 1:
        return parts[0], limit
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, limit


def check_loader_settings(batch_size: int, num_workers: int) -> None:
    """Clear errors for settings torch's DataLoader refuses with a traceback."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DinokitError(f"batch_size must be a positive number of images, got {batch_size}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise DinokitError(f"num_workers must be 0 (decode in this process) or more, got {num_workers}")


def image_loader(paths: Sequence[Path], transform, batch_size: int, num_workers: int, device: torch.device):
    """In-order DataLoader yielding (images, good indices, bad indices); bad files drop out. Its workers
    leave Ctrl-C and SIGTERM to the main process (`ignore_stop_signals`): a stop that reaches the whole
    process group (a terminal's Ctrl-C, torchrun's SIGTERM) then ends the work there, where a training
    run's k-NN monitor finishes its step and saves a checkpoint, instead of killing the workers first
    (with fork they would only inherit the main process's handlers; with spawn, macOS's default, or
    forkserver, they would die)."""
    check_loader_settings(batch_size, num_workers)
    return torch.utils.data.DataLoader(
        ImageFiles(list(paths), transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skipping_bad,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
    )


@torch.inference_mode()
def iter_features(
    model: VisionTransformer,
    paths: Sequence[Path],
    transform,
    which: Sequence[str] = ("cls",),
    layers: Sequence[int] = (),
    norm: bool = True,
    batch_size: int = 64,
    num_workers: int = 2,
    precision: str = "bf16",
    progress: bool = True,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]]:
    """Yield (indices into `paths`, features on CPU as float32, indices of unreadable files) per batch.

    The model runs in eval mode and is given back in the mode it came in (a model being trained stays
    in training). `precision` sets autocast for float32 and bf16 weights; a model.half() runs in
    float16 (bf16 autocast cannot mix with float16 weights). A batch the device has no memory for is
    run in halves (`compute_features_fitting`), and the smaller size kept for the rest of the images,
    with a warning naming the batch_size to pass; the features are the same."""
    weights = next(model.parameters())
    device = weights.device
    half = weights.dtype == torch.float16
    loader = image_loader(paths, transform, batch_size, num_workers, device)
    limit = batch_size  # images per forward pass: lowered for the rest of the run where memory runs out
    training = model.training
    model.eval()
    try:
        for images, good, bad in tqdm(loader, desc="features", unit="batch", disable=not progress, leave=False):
            if images is None:
                yield good, {}, bad
                continue
            with contextlib.nullcontext() if half else autocast(device, precision):
                images = images.to(device, non_blocking=True)
                feats, fitted = compute_features_fitting(model, images, limit, which, layers, norm)
            if fitted < limit:
                warnings.warn(
                    f"out of memory on {device} at batch_size={limit}: the features are computed {fitted} images "
                    f"at a time from here on (pass batch_size={fitted} next time)",
                    stacklevel=2,
                )
                limit = fitted
            yield good, {k: v.cpu() for k, v in feats.items()}, bad
    finally:
        model.train(training)


def extract_features(
    model: VisionTransformer, paths: Sequence[Path], transform, **kwargs
) -> tuple[dict, list[int], list[int]]:
    """All features in memory: ({kind: float32 CPU tensor (N, ...)}, kept, bad) for N readable images,
    row i of each tensor being paths[kept[i]]; bad: indices of unreadable files. The kinds and their
    shapes: FEATURE_KINDS (cls (N, D), patch_tokens (N, h*w, D), ...); `kwargs` as `iter_features`."""
    chunks: dict[str, list[torch.Tensor]] = {}
    kept: list[int] = []
    bad: list[int] = []
    for good, feats, bad_batch in iter_features(model, paths, transform, **kwargs):
        kept += good.tolist()
        bad += bad_batch
        for k, v in feats.items():
            chunks.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in chunks.items()}, kept, bad
