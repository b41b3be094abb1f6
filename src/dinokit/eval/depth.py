"""Linear depth probe: `dinokit eval depth` and `dinokit predict depth`.

The DINOv2 linear depth head (`dinov2/hub/depth`: BNHead with classify=True, "UD" bins, "linear"
normalisation), with the depth range as a real parameter (the official hub hard-codes 0.001-10 m, for
its KITTI heads too; `dinokit.eval.released_depth` applies the released heads):
- input: for each chosen block, its patch map and its CLS token broadcast over the map (2D channels
  per block), blocks concatenated; the blocks are the reference's (ViT-S/B [2, 5, 8, 11], ViT-L
  [4, 11, 17, 23], ViT-g [9, 19, 29, 39], else evenly spaced), or the last block alone; without the
  final LayerNorm (`norm=False`), as the reference;
- a 1x1 convolution to 256 logits, upsampled x4 bilinearly; p = (relu(logits) + 0.1) normalised over
  the bins; depth = sum_k p_k * bin_k with bins = linspace(min_depth, max_depth, 256);
- trained with SigLoss; the prediction is upsampled bilinearly to the target.
Reported: RMSE, AbsRel and delta < 1.25 per image over valid pixels (min_depth < gt <= max_depth),
averaged over images, beside two trivial baselines (the mean training depth everywhere, and the mean
training depth at each pixel position).
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dinokit.errors import DinokitError
from dinokit.eval.common import make_transform, prepare_backbone, protocol_record, resolve_cache
from dinokit.eval.dense import (
    check_training,
    clear_results,
    dense_split,
    predict_images,
    predict_split,
    read_depth,
    refuse_training_with_head,
    results_folder,
    train_dense_head,
    upsample,
)
from dinokit.eval.heads import backbone_for_head, head_metadata, load_head_file, save_head
from dinokit.eval.visualize import colour_depth, save_panel
from dinokit.io import atomic_write, prepare_output, refuse_other_outputs, write_json
from dinokit.runtime import resolve_device

DEPTH_EXTS = (".png", ".npy", ".tif", ".tiff")
REFERENCE_BLOCKS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}  # hub out_index per depth
MAX_PIXELS = 1_000_000  # a released head runs larger images shrunk to this many pixels (eval/released_depth.py)


def depth_blocks(depth: int, n_layers: int) -> tuple[int, ...]:
    """The reference's blocks for the 4-layer head (evenly spaced for other depths), or the last."""
    if n_layers == 1:
        return (depth - 1,)
    if n_layers != 4:
        raise DinokitError(f"n_layers must be 1 or 4 (the reference's linear and linear4 heads), got {n_layers}")
    if depth in REFERENCE_BLOCKS:
        return REFERENCE_BLOCKS[depth]
    return tuple(sorted({max(0, round((i + 1) * depth / 4) - 1) for i in range(4)}))


class SigLoss(nn.Module):
    """Scale-invariant log loss (Eigen et al. 2014, as AdaBins / the DINOv2 depth heads), over the valid
    pixels (0 < gt <= max_depth) of the whole batch:
        g = log(pred + eps) - log(gt + eps)
        L = sqrt(Var(g) + lam * mean(g)^2)        eps = 1e-3, lam = 0.15, Var unbiased
    """

    def __init__(self, max_depth: float | None = None, eps: float = 1e-3, lam: float = 0.15) -> None:
        super().__init__()
        self.max_depth, self.eps, self.lam = max_depth, eps, lam

    def forward(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        pred = pred.reshape(gt.shape)
        valid = gt > 0
        if self.max_depth is not None:
            valid &= gt <= self.max_depth
        if valid.sum() < 2:
            return pred.sum() * 0.0
        g = torch.log(pred[valid] + self.eps) - torch.log(gt[valid] + self.eps)
        return torch.sqrt(torch.var(g) + self.lam * g.mean() ** 2)


class LinearDepthHead(nn.Module):
    """(B, L, N, D) patch tokens + (B, L, D) CLS -> depth (B, 1, 4h, 4w) in [min_depth, max_depth]."""

    def __init__(
        self, embed_dim: int, num_layers: int, min_depth: float, max_depth: float, n_bins: int = 256, scale: int = 4
    ) -> None:
        super().__init__()
        if not 0 <= min_depth < max_depth:
            raise DinokitError(f"need 0 <= min_depth < max_depth, got {min_depth}, {max_depth}")
        self.conv = nn.Conv2d(2 * embed_dim * num_layers, n_bins, kernel_size=1)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins))
        self.scale = scale

    def forward(self, tokens: torch.Tensor, cls: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n_layers, _, d = tokens.shape
        maps = tokens.permute(0, 1, 3, 2).reshape(b, n_layers, d, *grid)
        with_cls = torch.cat([maps, cls[..., None, None].expand_as(maps)], dim=2)  # (B, L, 2D, h, w)
        logits = self.conv(with_cls.flatten(1, 2))
        # Upsampling the logits equals the reference's upsampling of the features before the conv: a 1x1
        # conv and bilinear interpolation (weights summing to one) are linear maps that commute.
        logits = F.interpolate(logits, scale_factor=self.scale, mode="bilinear", align_corners=False)
        p = torch.relu(logits) + 0.1
        p = p / p.sum(dim=1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", p, self.bins).unsqueeze(1)


def evaluate_depth(head, split, read, min_depth, max_depth, device, train_targets) -> tuple[dict, dict]:
    """(probe errors, {baseline: errors}) on `split`, each image at its original size."""
    from dinokit.eval.metrics import depth_errors, mean_depth_errors  # scipy and scikit-image: not for `--help`

    valid = (train_targets > min_depth) & (train_targets <= max_depth)
    mean = float(train_targets[valid].mean())
    per_pixel = (train_targets * valid).sum(0) / valid.sum(0).clamp(min=1)
    per_pixel = torch.where(valid.sum(0) > 0, per_pixel, torch.tensor(mean))
    probe, constant, positional = [], [], []
    for pos, pred in predict_split(head, split, device):
        gt = torch.from_numpy(read(split.target_paths[pos]))
        pred = pred[0].clamp(min_depth, max_depth)
        probe.append(depth_errors(pred, gt, min_depth, max_depth))
        constant.append(depth_errors(torch.full_like(gt, mean), gt, min_depth, max_depth))
        prior = upsample(per_pixel[None, None], tuple(gt.shape))[0, 0]
        positional.append(depth_errors(prior, gt, min_depth, max_depth))
    baselines = {"train_mean": mean_depth_errors(constant), "per_pixel_mean": mean_depth_errors(positional)}
    return mean_depth_errors(probe), baselines


def eval_depth(
    model: str | None = None,
    train: str | None = None,
    val: str | None = None,
    out: str = "out/eval-depth",
    min_depth: float = 0.001,
    max_depth: float | None = None,
    depth_scale: float | None = None,
    n_layers: int = 4,
    norm: bool = False,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    train_batch_size: int = 16,
    num_examples: int = 4,
    image_size: int = 224,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "bf16",
    cache: str = "auto",
    seed: int = 0,
    head: str | None = None,
    crop: str = "auto",
) -> str:
    """Linear depth probe on frozen features (DINOv2's linear head, SigLoss), or a saved / released head scored.

    Reported: RMSE, AbsRel, delta1. With head=, the errors of a saved or released head on val (no
    training): see the last paragraph.

    train, val: folders with images/ and depth/ (same names, subfolders mirrored): integer data (a
    16-bit PNG, an integer .npy) in 1/depth_scale metres, e.g. millimetres for depth_scale=1000; float
    data (a float .npy or TIFF) in metres, not scaled; 0 = no measurement. Unreadable images or depth
    files are skipped and counted. min_depth, max_depth: the range of the 256 bins and of the evaluated pixels
    (max_depth: by default the largest training depth, at full size). n_layers: 4 (the reference's
    blocks) or 1 (the last). norm: apply the final LayerNorm (the reference does not). Writes
    out/depth.json, out/depth_head.safetensors (for `dinokit predict depth`), out/metrics.jsonl and
    out/examples/*.png (image | truth | prediction). A rerun into the same out first removes
    depth.json, then the earlier head, metrics.jsonl and examples/, and writes depth.json last: where
    it exists, the files beside it are its run's (a run stopped partway leaves no json). out must
    not hold eval segmentation's results (segmentation.json), which share those files, nor files of
    those names that no eval depth wrote (your own examples/), nor be the out of a run still going on
    (a second run into it is refused at once). depth_scale: default 1000.

    Scoring a head (head=, no train=; the training keys n_layers, norm, epochs, lr, weight_decay,
    train_batch_size, image_size, cache and seed do not apply): head is a released DINOv2 depth head (a
    name such as dinov2_vits14_nyu_linear4_head or its .pth, applied as `dinokit predict depth` applies
    it; max_depth= its range top as there) or a head file of `dinokit eval depth` (its trained range).
    model: by default the head's backbone. val: images/ and depth/ of the images' sizes. depth_scale:
    default 1000 for NYU (millimetres), 256 for KITTI, a dinokit head's own. Scored per image over the
    pixels with min_depth < gt < the head's max depth (<= for a dinokit head, as its training run)
    inside crop, then averaged over images (the Monocular-Depth-Estimation-Toolbox's protocol):
    crop=eigen (NYU's 480 x 640 crop), garg (KITTI's, of the map as given), kb_garg (the released KITTI
    configs': image and ground truth cut to the bottom 352 rows and middle 1216 columns first, a released
    head only) or none; auto: eigen for an nyu head, kb_garg for a kitti one, else none. Writes
    out/depth.json (rmse, abs_rel, delta1-3 in %, sq_rel, rmse_log, log10, silog, the protocol) and
    out/examples/*.png, replacing an earlier result there; out must not hold a trained head.
    """
    out_dir = prepare_output(out, folder=True, create=False)  # a bad out= fails before any work
    refuse_other_outputs(out_dir, ("segmentation.json", "depth.json"), "dinokit eval")
    if val is None:
        raise DinokitError("val=... is needed: a folder with images/ and depth/ (depth maps, same names)")
    if head is not None:
        refuse_training_with_head(head, train)
        from dinokit.eval.head_scores import score_depth

        with results_folder(out_dir, "depth"):  # one run at a time in out
            score_depth(
                head,
                val,
                out_dir,
                model,
                min_depth,
                max_depth,
                depth_scale,
                crop,
                num_examples,
                batch_size,
                num_workers,
                device,
                precision,
            )
        return str(out_dir / "depth.json")
    if crop != "auto":
        raise DinokitError("crop= applies to scoring a head (head=...), not to training: leave it out")
    if model is None or train is None:
        raise DinokitError(
            "model=... and train=... are needed to train a head (a backbone and a folder with images/ and depth/), "
            "or head=... to score a saved or released one on val="
        )
    depth_scale = 1000.0 if depth_scale is None else depth_scale
    check_training(epochs, train_batch_size, lr, weight_decay)
    if not depth_scale > 0:  # 0 gave NaN errors as a result; a negative scale, maps 'without measurement'
        raise DinokitError(
            f"depth_scale must be > 0 (integer depth-image units per metre, e.g. 1000 for millimetres), "
            f"got {depth_scale}"
        )
    dev = resolve_device(device)
    with results_folder(out_dir, "depth"):  # one run at a time in out
        backbone = prepare_backbone(model, device, seed)
        layers = depth_blocks(len(backbone.model.blocks), n_layers)

        def read(path: Path) -> np.ndarray:
            return read_depth(path, depth_scale)

        kw = dict(
            image_size=image_size,
            layers=layers,
            with_cls=True,
            norm=norm,
            cache=resolve_cache(cache),
            batch_size=batch_size,
            num_workers=num_workers,
            precision=precision,
        )
        tr = dense_split(backbone, train, "depth", DEPTH_EXTS, read, **kw)
        va = dense_split(backbone, val, "depth", DEPTH_EXTS, read, **kw)
        if tr.target_max is None or tr.target_max <= 0:
            raise DinokitError(
                f"the depth maps of {train} hold no measurement (all 0): check depth_scale and the files"
            )
        if max_depth is None:
            max_depth = tr.target_max
            print(f"max_depth={max_depth:.3f} (the largest training depth; pass max_depth= to set the range)")
        head = LinearDepthHead(backbone.model.embed_dim, len(layers), min_depth, max_depth)
        clear_results(out_dir, "depth")
        log = train_dense_head(
            head,
            SigLoss(max_depth),
            tr,
            epochs,
            train_batch_size,
            lr,
            weight_decay,
            seed,
            dev,
            out_dir / "metrics.jsonl",
        )
        errors, baselines = evaluate_depth(head, va, read, min_depth, max_depth, dev, tr.train_targets)
        meta = head_metadata(
            backbone,
            image_size,
            layers,
            norm,
            seed,
            task="depth",
            reduced_decode=True,  # its features' transform (dense.make_transform's default)
            with_cls=True,
            min_depth=min_depth,
            max_depth=max_depth,
            depth_scale=depth_scale,
        )
        save_head(out_dir / "depth_head.safetensors", head, meta)
        examples = write_examples(head, va, read, min_depth, max_depth, dev, out_dir / "examples", num_examples)
        protocol = protocol_record(
            backbone,
            make_transform(image_size, "resize"),
            image_size,
            precision,
            head="DINOv2 linear depth head: patch map + broadcast CLS per block, 1x1 conv to 256 bins, x4 "
            "bilinear, linear bin normalisation",
            blocks=list(layers),
            final_norm=norm,
            bins=f"linspace({min_depth}, {max_depth}, 256)",
            loss="SigLoss (lambda 0.15, eps 1e-3)",
            optimiser=f"AdamW lr {lr} wd {weight_decay}, cosine to 0, {epochs} epochs, batch {train_batch_size}",
            augmentation="none (cached features)",
            metric=f"per image over min_depth < gt <= max_depth ({min_depth}, {max_depth}), averaged over images",
            resize="whole image resized to image_size x image_size (bicubic), no crop",
            train=str(train),
            val=str(val),
            train_images=len(tr),
            val_images=len(va),
            train_bad_files=tr.bad_files,
            val_bad_files=va.bad_files,
        )
        result = {**errors, "baselines": baselines, "training": log, "examples": examples, "protocol": protocol}
        write_json(out_dir / "depth.json", result)
        print(
            f"linear depth {backbone.description}, blocks {list(layers)}, {image_size} px, "
            f"range {min_depth}-{max_depth}; transform: {protocol['transform']}"
        )
        print(f"{'':<24} {'RMSE':>8} {'AbsRel':>8} {'d<1.25':>8}")
        for name, e in [("probe", errors), *((f"baseline ({k})", v) for k, v in baselines.items())]:
            print(f"{name:<24} {e['rmse']:>8.4f} {e['abs_rel']:>8.4f} {e['delta1']:>8.2f}")
        return str(out_dir / "depth.json")


def write_examples(head, split, read, min_depth, max_depth, device, folder: Path, count: int) -> list[str]:
    """image | truth | prediction panels of the first `count` images of `split`."""
    from dinokit.data.images import open_rgb

    written = []
    for pos, pred in predict_split(head, split, device):
        if pos >= count:
            break
        gt = read(split.target_paths[pos])
        rgb = np.asarray(open_rgb(split.images[pos]))
        tiles = [
            rgb,
            colour_depth(gt, min_depth, max_depth, gt > 0),
            colour_depth(pred[0].numpy(), min_depth, max_depth),
        ]
        path = folder / f"{split.names[pos]}.png"
        save_panel(path, tiles)
        written.append(str(path))
    return written


def load_depth_head(path: str) -> tuple[LinearDepthHead, dict]:
    state, meta = load_head_file(path, "depth")
    in_channels = state["conv.weight"].shape[1]
    head = LinearDepthHead(
        in_channels // (2 * len(meta["layers"])), len(meta["layers"]), meta["min_depth"], meta["max_depth"]
    )
    head.load_state_dict(state)
    return head.eval(), meta


def predict_depth(
    head: str,
    images: str,
    out: str = "out/predict-depth",
    model: str | None = None,
    batch_size: int = 16,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "bf16",
    depth_scale: float | None = None,
    max_depth: float | None = None,
    max_pixels: int | None = MAX_PIXELS,
) -> str:
    """Apply a saved depth head to new images: 16-bit depth PNGs and coloured pictures.

    head: out/depth_head.safetensors of `dinokit eval depth`; or a released DINOv2 depth head, a name
    dinov2_vit{s,b,l,g}14_{nyu,kitti}_{linear,linear4,dpt}_head (downloaded once, with its backbone) or
    its .pth file (any .pth with model=), applied as the official hub does (each image whole at its own
    size, one at a time: batch_size and num_workers do not apply; one of more than max_pixels pixels runs
    shrunk to them, its depth resized to its size, for memory: max_pixels=none runs every image whole;
    `dinokit.eval.released_depth`).
    images: a folder, an image or a list file. model: the backbone (default: the one the head was
    trained on, checked by hash; for a released head the one its name says, checked by shape). Writes
    out/<name>.png (uint16, depth x depth_scale; <name> keeps the image's subfolders) and
    out/<name>_depth.png. depth_scale: by default the one of training (1000: millimetres); for a released
    head 1000 where its range fits 16 bits in millimetres (NYU's 10 m, or max_depth=10), else 256 (KITTI's
    80 m, KITTI's own PNG convention: 80 x 1000 does not fit 16 bits). Depths beyond 65535 / depth_scale
    metres are clipped (with a warning).
    max_depth: a released head's range top in metres (default NYU 10, KITTI 80; needed where a .pth's
    name does not say its dataset); a dinokit head keeps its trained range. A rerun into the same out
    first removes the earlier run's predictions (the files it listed in out/.dinokit-predictions.json;
    no other file), so out holds this run's alone.
    """
    from dinokit.eval.heads import is_released_head
    from dinokit.eval.released_depth import load_released_depth_head, released_depth_maps

    out_dir = prepare_output(out, folder=True, create=False)  # a bad out= fails before any work
    if depth_scale is not None and not depth_scale > 0:
        raise DinokitError(f"depth_scale must be > 0 (PNG units per metre), got {depth_scale}")
    out_files = (out_dir, (".png", "_depth.png"))
    if is_released_head(head, "depth"):
        depther = load_released_depth_head(head, model, device, max_depth, precision, max_pixels)
        low, high = depther.min_depth, depther.max_depth
        scale = depth_scale or png_depth_scale(high)
        maps = released_depth_maps(depther, images, out_files)
        print(f"released depth head {head}: range {low:g}-{high:g} m, PNG units 1/{scale:g} m")
    else:
        refuse_max_depth(max_depth)
        net, meta = load_depth_head(head)
        backbone = backbone_for_head(meta, model, device)
        net.to(resolve_device(device))
        low, high = meta["min_depth"], meta["max_depth"]
        scale = depth_scale or meta["depth_scale"]
        predictions = predict_images(net, meta, backbone, images, out_files, batch_size, num_workers, precision)
        maps = ((name, rgb, pred[0].clamp(low, high).numpy()) for name, rgb, pred in predictions)
    count = clipped = 0
    for name, rgb, depth in maps:
        units, over = depth_units(depth, scale)
        clipped += over
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / f"{name}.png", lambda tmp, u=units: Image.fromarray(u).save(tmp, format="PNG"))
        save_panel(out_dir / f"{name}_depth.png", [rgb, colour_depth(depth, low, high)])
        count += 1
    print(f"wrote {count} depth maps to {out_dir}")
    if clipped:
        print(
            f"warning: {clipped} pixel(s) deeper than {65535 / scale:g} m were clipped to 65535 in the 16-bit "
            f"PNGs (depth_scale={scale:g}); pass depth_scale={math.floor(65535 / high)} or lower "
            f"to fit the head's range up to {high:g} m"
        )
    return str(out_dir)


def refuse_max_depth(max_depth: float | None) -> None:
    """max_depth= sets a released head's range; a dinokit head file keeps its trained one."""
    if max_depth is not None:
        raise DinokitError(
            "max_depth= applies to released heads (a released name or a .pth); a head of dinokit eval depth "
            "keeps the range it was trained with: leave max_depth out"
        )


def png_depth_scale(max_depth: float) -> float:
    """A released head's 16-bit PNG units per metre: 1000 (millimetres, NYU's) where max_depth fits 16 bits
    in them, else 256 (KITTI's 1/256 m)."""
    return 1000.0 if max_depth * 1000 <= 65535 else 256.0


def depth_units(depth: np.ndarray, depth_scale: float) -> tuple[np.ndarray, int]:
    """(uint16 depth x depth_scale, how many pixels were beyond 65535 and clipped to it)."""
    units = np.round(depth.astype(np.float64) * depth_scale)
    return np.clip(units, 0, 65535).astype(np.uint16), int((units > 65535).sum())
