"""What the dense probes share: image / target folder pairs, cached per-block patch features, the
training loop of a linear head on them, and prediction at each image's own size.

Data: `root/images/<name>.<ext>` with `root/masks/<name>.png` (segmentation: class index per pixel,
`ignore_index` for unlabelled pixels) or `root/depth/<name>.png|.npy` (depth: 16-bit PNG in units of
1/depth_scale metres, or float .npy in metres; 0 = no measurement). Images are resized whole (no crop)
to image_size x image_size, so features and targets stay aligned; a head's output is upsampled
bilinearly to the target, at training time to image_size and at evaluation to each image's original
size. Training reads the cached features (no augmentation: features once, probes many).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from dinokit.data.images import list_images
from dinokit.errors import DinokitError
from dinokit.eval.cache import Features
from dinokit.eval.common import Backbone, check_image_size, make_transform, split_features
from dinokit.io import atomic_write
from dinokit.runtime import reuse_freed_memory


# ---------------------------------------------------------------------------------------------- data
def read_pairs(root: str | Path, target_folder: str, target_exts: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """(image paths, target paths) of `root/images` and `root/<target_folder>`, matched by file stem."""
    root = Path(root).expanduser()
    images_dir, targets_dir = root / "images", root / target_folder
    if not images_dir.is_dir() or not targets_dir.is_dir():
        raise DinokitError(
            f"{root} must hold images/ and {target_folder}/ folders with files of the same names "
            f"(e.g. images/0001.jpg and {target_folder}/0001{target_exts[0]})"
        )
    images = list_images(images_dir)
    targets = {p.stem: p for p in sorted(targets_dir.iterdir()) if p.suffix.lower() in target_exts}
    missing = [p for p in images if p.stem not in targets]
    if missing:
        raise DinokitError(
            f"{len(missing)} image(s) in {images_dir} have no {target_folder} file in {targets_dir} "
            f"(e.g. {missing[0].name} needs {target_folder}/{missing[0].stem}{target_exts[0]})"
        )
    return images, [targets[p.stem] for p in images]


def read_mask(path: Path) -> np.ndarray:
    """(H, W) int64 class indices of a single-channel (L, P, I;16 or I) PNG."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
            raise DinokitError(
                f"{path} is a {im.mode} image; a mask must hold one class index per pixel "
                "(8/16-bit grayscale or palette PNG), not colours"
            )
        return np.asarray(im).astype(np.int64)


def read_depth(path: Path, depth_scale: float) -> np.ndarray:
    """(H, W) float32 metres: .npy as is, a 16-bit PNG divided by depth_scale."""
    if path.suffix.lower() == ".npy":
        depth = np.load(path, allow_pickle=False)
        if depth.ndim == 3 and depth.shape[-1] == 1:
            depth = depth[..., 0]
        if depth.ndim != 2:
            raise DinokitError(f"{path} holds an array of shape {depth.shape}; a depth map must be (H, W)")
        return np.nan_to_num(depth.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    with Image.open(path) as im:
        return np.asarray(im).astype(np.float32) / depth_scale


def resize_target(target: np.ndarray, size: int) -> torch.Tensor:
    """Nearest-neighbour resize of an (H, W) target to (size, size), so labels and depths are not mixed;
    class indices come back as int16 (int32 beyond its range), depths as float32."""
    t = F.interpolate(torch.from_numpy(target)[None, None].float(), size=(size, size), mode="nearest")[0, 0]
    if np.issubdtype(target.dtype, np.integer):
        small = target.size == 0 or (target.min() >= -(2**15) and target.max() < 2**15)
        return t.to(torch.int16 if small else torch.int32)
    return t


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
) -> DenseSplit:
    """Read a split's pairs, take its features from the cache (extracting what is missing)."""
    check_image_size(backbone, image_size)
    images, targets = read_pairs(root, target_folder, target_exts)
    transform = make_transform(image_size, "resize")
    which = ("layer_patch_tokens", "layers") if with_cls else ("layer_patch_tokens",)
    feats = split_features(
        backbone, root, images, transform, which, layers, norm, cache, batch_size, num_workers, precision
    )
    kept = feats.kept.tolist()
    train_targets, sizes = [], []
    for i in kept:  # full-size targets are read again at evaluation, not kept in memory
        target = read_target(targets[i])
        sizes.append(target.shape)
        train_targets.append(resize_target(target, image_size))
    side = image_size // backbone.model.patch_size
    images, targets = [images[i] for i in kept], [targets[i] for i in kept]
    return DenseSplit(feats, images, targets, torch.stack(train_targets), sizes, (side, side), str(root))


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


def save_head(path: Path, head: nn.Module, metadata: dict) -> None:
    """Weights as safetensors with everything needed to apply the head again (JSON metadata)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"dinokit_head": json.dumps(metadata)}))


def load_head_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DinokitError(f"head file not found: {path} (eval segmentation / eval depth write one into out/)")
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("dinokit_head")
    if meta is None:
        raise DinokitError(f"{path} is not a dinokit head file (no dinokit_head metadata)")
    return load_file(str(path)), json.loads(meta)


# -------------------------------------------------------------------------------------------- training
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
def head_metadata(backbone: Backbone, image_size: int, layers: tuple[int, ...], norm: bool, seed: int, **extra) -> dict:
    """What `predict` needs to rebuild a head's input: the backbone, resolution and blocks."""
    return {
        "model": backbone.source,
        "weights_hash": backbone.hash,
        "seed": seed,
        "image_size": image_size,
        "layers": list(layers),
        "norm": norm,
        "patch_size": backbone.model.patch_size,
        **extra,
    }


def backbone_for_head(meta: dict, model: str | None, device: str) -> Backbone:
    """The backbone a head was trained on (from its metadata, or `model=`), checked by weights hash."""
    from dinokit.eval.common import prepare_backbone

    backbone = prepare_backbone(model or meta["model"], device, meta.get("seed", 0))
    if backbone.hash != meta["weights_hash"]:
        raise DinokitError(
            f"the head was trained on features of {meta['model']} (weights hash {meta['weights_hash']}), "
            f"but model={model or meta['model']} has weights hash {backbone.hash}. Pass the backbone the "
            f"head was trained with as model=..."
        )
    return backbone


@torch.no_grad()
def predict_images(
    head: nn.Module, meta: dict, backbone: Backbone, images: str, batch_size: int, num_workers: int, precision: str
):
    """Yield (image path, RGB array at original size, head output (C, H, W) at that size)."""
    from dinokit.data.images import open_rgb
    from dinokit.features.extract import iter_features

    paths = list_images(images)
    transform = make_transform(meta["image_size"], "resize")
    which = ("layer_patch_tokens", "layers") if meta.get("with_cls") else ("layer_patch_tokens",)
    side = meta["image_size"] // meta["patch_size"]
    device = next(head.parameters()).device
    bad = []
    stream = iter_features(
        backbone.model,
        paths,
        transform,
        which,
        meta["layers"],
        meta["norm"],
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
    )
    for good, feats, bad_batch in stream:
        bad += bad_batch
        if not feats:
            continue
        cls = feats["layers"].to(device) if "layers" in feats else None
        output = head(feats["layer_patch_tokens"].to(device), cls, (side, side)).float().cpu()
        for j, i in enumerate(good.tolist()):
            rgb = np.asarray(open_rgb(paths[i]))
            yield paths[i], rgb, upsample(output[j : j + 1], rgb.shape[:2])[0]
    if bad:
        print(f"skipped {len(bad)} unreadable image(s), e.g. {paths[bad[0]]}")
