"""Linear semantic-segmentation probe: `dinokit eval segmentation` and `dinokit predict segmentation`.

The DINOv2 "linear" protocol (mmseg `BNHead`): the patch tokens of the last block, or of the last 4
concatenated, as a (B, L*D, h, w) map -> BatchNorm -> 1x1 convolution to class logits -> bilinear
upsampling to the target -> cross-entropy over labelled pixels (`ignore_index` excluded). Reported:
mIoU and pixel accuracy on val at each image's original size, beside the trivial baseline of
predicting the most frequent training class everywhere.

The training recipe is dinokit's own (the official repository has none; its released heads were
trained with mmseg): AdamW with a cosine schedule on cached features of the whole image resized, no
augmentation, a single-process BatchNorm (mmseg: SyncBN), and the cross-entropy averaged over the
labelled pixels of a batch (PyTorch's `ignore_index`; mmseg 0.x's `CrossEntropyLoss`, without
`avg_non_ignore`, divides by every pixel, ignored ones included).
"""

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
    patch_maps,
    predict_images,
    predict_split,
    read_mask,
    refuse_training_with_head,
    results_folder,
    train_dense_head,
)
from dinokit.eval.heads import backbone_for_head, head_metadata, load_head_file, save_head
from dinokit.eval.visualize import colour_mask, save_panel
from dinokit.io import atomic_write, prepare_output, refuse_other_outputs, write_json
from dinokit.runtime import resolve_device

MASK_EXTS = (".png", ".tif", ".tiff", ".bmp")


class LinearSegmentationHead(nn.Module):
    """BatchNorm + 1x1 conv on patch tokens: (B, L, N, D) -> logits (B, num_classes, h, w)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)  # mmseg's conv_seg init
        nn.init.zeros_(self.conv.bias)

    def forward(self, tokens: torch.Tensor, cls: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        return self.conv(self.bn(patch_maps(tokens, grid)))


def segmentation_loss(ignore_index: int):
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)

    return loss


def predict_classes(logits: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(H, W) class per pixel of (C, H, W) logits. An ignore_index inside 0..C-1 labels no class (e.g. 0
    with classes 1..K): it is never predicted."""
    if 0 <= ignore_index < logits.shape[0]:
        logits = logits.clone()
        logits[ignore_index] = float("-inf")
    return logits.argmax(0)


def evaluate_segmentation(
    head, split, num_classes: int, ignore_index: int, device, train_targets: torch.Tensor
) -> tuple[dict, dict]:
    """(probe scores, {baseline: scores}) on `split`, each image at its original size. Baselines: the
    most frequent training class everywhere, and the most frequent training class at each position.
    None of them predicts an ignore_index that lies in 0..num_classes-1."""
    from dinokit.eval.metrics import confusion_matrix, segmentation_scores  # scipy and scikit-image: not for `--help`

    labelled = split_labels(train_targets, ignore_index, num_classes)
    majority = int(torch.bincount(labelled, minlength=num_classes).argmax())
    t = train_targets.long()
    counts = torch.stack([(t == c).sum(0) for c in range(num_classes)])  # (C, S, S)
    prior = predict_classes(counts.float(), ignore_index).float()[None, None]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    positional = torch.zeros_like(confusion)
    for pos, logits in predict_split(head, split, device):
        target = torch.from_numpy(read_mask(split.target_paths[pos]))
        labelled = target[target != ignore_index]
        if len(labelled) and (labelled.max() >= num_classes or labelled.min() < 0):
            raise DinokitError(
                f"{split.target_paths[pos]} holds class {int(labelled.max())} but num_classes={num_classes} "
                f"(from the train masks or num_classes=): pass num_classes={int(labelled.max()) + 1}"
            )
        confusion += confusion_matrix(predict_classes(logits, ignore_index), target, num_classes, ignore_index)
        prior_here = F.interpolate(prior, size=tuple(target.shape), mode="nearest")[0, 0]
        positional += confusion_matrix(prior_here, target, num_classes, ignore_index)
    constant = torch.zeros_like(confusion)
    constant[:, majority] = confusion.sum(1)  # every labelled pixel predicted as `majority`
    baselines = {
        "majority_class": segmentation_scores(constant, ignore_index) | {"class": majority},
        "per_pixel_majority": segmentation_scores(positional, ignore_index),
    }
    return segmentation_scores(confusion, ignore_index), baselines


def split_labels(targets: torch.Tensor, ignore_index: int, num_classes: int) -> torch.Tensor:
    t = targets.long().flatten()
    return t[(t != ignore_index) & (t >= 0) & (t < num_classes)]


def eval_segmentation(
    model: str | None = None,
    train: str | None = None,
    val: str | None = None,
    out: str = "out/eval-segmentation",
    num_classes: int | None = None,
    ignore_index: int | None = None,
    n_last_blocks: int = 1,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    train_batch_size: int = 16,
    num_examples: int = 4,
    image_size: int | None = None,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "bf16",
    cache: str = "auto",
    seed: int = 0,
    head: str | None = None,
    reduce_zero_label: bool | None = None,
    scales: list[float] | None = None,
    flip: bool | None = None,
) -> str:
    """Linear segmentation probe on frozen patch tokens (mIoU on val), or a saved / released head scored.

    With head=, the scores of a saved or released head on val (no training): see the last paragraph.

    train, val: folders with images/ and masks/ (PNG of class indices, same file names; pixels equal
    to ignore_index are unlabelled; subfolders of images/ mirrored under masks/). An ignore_index
    inside 0..num_classes-1 (e.g. 0 with classes 1..K) is never predicted nor averaged into mIoU.
    n_last_blocks: 1 (the linear protocol) or 4 (concatenated). num_classes: by default the largest
    class index in the train masks (at full size) + 1. Unreadable images or masks are skipped and
    counted. Writes
    out/segmentation.json, out/segmentation_head.safetensors (for `dinokit predict segmentation`),
    out/metrics.jsonl and out/examples/*.png (image | truth | prediction). A rerun into the same out
    first removes segmentation.json, then the earlier head, metrics.jsonl and examples/, and writes
    segmentation.json last: where it exists, the files beside it are its run's (a run stopped partway
    leaves no json). out must not hold eval depth's results (depth.json), which share those files,
    nor files of those names that no eval segmentation wrote (your own examples/), nor be the out of
    a run still going on (a second run into it is refused at once).
    ignore_index: default 255; image_size: default 224.

    Scoring a head (head=, no train=; the training keys num_classes, n_last_blocks, epochs, lr,
    weight_decay, train_batch_size, cache and seed do not apply): head is a released DINOv2 head (a name
    such as dinov2_vits14_ade20k_linear_head or its .pth, applied as `dinokit predict segmentation`
    applies it, with its scales, flip and image_size, except that an ms head's scales default to the
    configs' 5 ratios [1.0, 1.32, 1.73, 2.28, 3.0], those of its published numbers, where predict
    uses the notebook's first 3) or a head file of `dinokit eval segmentation`
    (applied at its trained size and blocks). model: by default the head's backbone. val: images/ and
    masks/ of the images' sizes. reduce_zero_label: map the masks' 0 to ignored and k to k - 1 as mmseg
    (ADE20K's annotations: 0 = other, 1..150 the classes); default true for a released ade20k head, else
    false. ignore_index: default 255 (mmseg's; a dinokit head's own). Writes out/segmentation.json (mIoU,
    aAcc as pixel_accuracy, mAcc as mean_accuracy, per-class IoU, class names where known, the protocol)
    and out/examples/*.png, replacing an earlier result there; out must not hold a trained head.
    """
    out_dir = prepare_output(out, folder=True, create=False)  # a bad out= fails before any work
    refuse_other_outputs(out_dir, ("segmentation.json", "depth.json"), "dinokit eval")
    if val is None:
        raise DinokitError("val=... is needed: a folder with images/ and masks/ (class-index PNGs, same names)")
    if head is not None:
        refuse_training_with_head(head, train)
        from dinokit.eval.head_scores import score_segmentation

        with results_folder(out_dir, "segmentation"):  # one run at a time in out
            score_segmentation(
                head,
                val,
                out_dir,
                model,
                reduce_zero_label,
                ignore_index,
                scales,
                flip,
                image_size,
                num_examples,
                batch_size,
                num_workers,
                device,
                precision,
            )
        return str(out_dir / "segmentation.json")
    scoring_keys = (("reduce_zero_label", reduce_zero_label), ("scales", scales), ("flip", flip))
    given = [k for k, v in scoring_keys if v is not None]
    if given:
        raise DinokitError(f"{', '.join(given)} apply to scoring a head (head=...), not to training: leave them out")
    if model is None or train is None:
        raise DinokitError(
            "model=... and train=... are needed to train a head (a backbone and a folder with images/ and masks/), "
            "or head=... to score a saved or released one on val="
        )
    ignore_index = 255 if ignore_index is None else ignore_index
    image_size = 224 if image_size is None else image_size
    check_training(epochs, train_batch_size, lr, weight_decay)
    dev = resolve_device(device)
    with results_folder(out_dir, "segmentation"):  # one run at a time in out
        backbone = prepare_backbone(model, device, seed)
        depth = len(backbone.model.blocks)
        if not 1 <= n_last_blocks <= depth:
            raise DinokitError(f"n_last_blocks must be between 1 and the model's {depth} blocks, got {n_last_blocks}")
        layers = tuple(range(depth - n_last_blocks, depth))
        kw = dict(
            image_size=image_size,
            layers=layers,
            with_cls=False,
            norm=True,
            cache=resolve_cache(cache),
            batch_size=batch_size,
            num_workers=num_workers,
            precision=precision,
        )
        tr = dense_split(backbone, train, "masks", MASK_EXTS, read_mask, **kw, ignore=ignore_index)
        va = dense_split(backbone, val, "masks", MASK_EXTS, read_mask, **kw, ignore=ignore_index)
        if tr.target_max is None:
            raise DinokitError(f"the masks of {train} have no labelled pixel (all equal ignore_index={ignore_index})")
        num_classes = num_classes or int(tr.target_max) + 1
        for source, split in ((train, tr), (val, va)):  # before training: cross_entropy / scoring would fail
            if split.target_max is not None and split.target_max >= num_classes:
                raise DinokitError(
                    f"{Path(source) / 'masks'} holds class {int(split.target_max)} but num_classes={num_classes} "
                    f"(classes are 0..num_classes-1): pass num_classes={int(split.target_max) + 1}"
                    + (", or leave it out to take it from the masks" if split is tr else "")
                )
        d = backbone.model.embed_dim
        head = LinearSegmentationHead(d * len(layers), num_classes)
        clear_results(out_dir, "segmentation")
        log = train_dense_head(
            head,
            segmentation_loss(ignore_index),
            tr,
            epochs,
            train_batch_size,
            lr,
            weight_decay,
            seed,
            dev,
            out_dir / "metrics.jsonl",
        )
        scores, baselines = evaluate_segmentation(head, va, num_classes, ignore_index, dev, tr.train_targets)

        meta = head_metadata(
            backbone,
            image_size,
            layers,
            True,
            seed,
            task="segmentation",
            reduced_decode=True,  # its features' transform (dense.make_transform's default)
            num_classes=num_classes,
            ignore_index=ignore_index,
        )
        save_head(out_dir / "segmentation_head.safetensors", head, meta)
        examples = write_examples(head, va, num_classes, ignore_index, dev, out_dir / "examples", num_examples)
        protocol = protocol_record(
            backbone,
            make_transform(image_size, "resize"),
            image_size,
            precision,
            head="BatchNorm + 1x1 conv on patch tokens (DINOv2 linear BNHead), bilinear upsampling",
            blocks=list(layers),
            resize="whole image resized to image_size x image_size (bicubic), no crop",
            loss=f"cross-entropy, ignore_index={ignore_index}",
            optimiser=f"AdamW lr {lr} wd {weight_decay}, cosine to 0, {epochs} epochs, batch {train_batch_size}",
            augmentation="none (cached features)",
            metric="mIoU over classes present in truth or prediction (not ignore_index), pixel accuracy; "
            "full resolution",
            train=str(train),
            val=str(val),
            train_images=len(tr),
            val_images=len(va),
            train_bad_files=tr.bad_files,
            val_bad_files=va.bad_files,
            num_classes=num_classes,
        )
        result = {
            "miou": scores["miou"],
            "pixel_accuracy": scores["pixel_accuracy"],
            "iou_per_class": scores["iou"],
            "baselines": baselines,
            "training": log,
            "examples": examples,
            "protocol": protocol,
        }
        write_json(out_dir / "segmentation.json", result)
        print(
            f"linear segmentation {backbone.description}, blocks {list(layers)}, {image_size} px; "
            f"transform: {protocol['transform']}"
        )
        print(f"{'':<30} {'mIoU':>7} {'pixel acc':>10}")
        for name, r in [("probe", scores), *((f"baseline ({k})", v) for k, v in baselines.items())]:
            print(f"{name:<30} {r['miou']:>7.2f} {r['pixel_accuracy']:>10.2f}")
        return str(out_dir / "segmentation.json")


def write_examples(head, split, num_classes, ignore_index, device, folder: Path, count: int) -> list[str]:
    """image | truth | prediction panels of the first `count` images of `split`."""
    from dinokit.data.images import open_rgb

    written = []
    for pos, logits in predict_split(head, split, device):
        if pos >= count:
            break
        truth = read_mask(split.target_paths[pos])
        pred = predict_classes(logits, ignore_index).numpy()
        rgb = np.asarray(open_rgb(split.images[pos]))
        path = folder / f"{split.names[pos]}.png"
        save_panel(path, [rgb, colour_mask(truth, num_classes, ignore_index), colour_mask(pred, num_classes)])
        written.append(str(path))
    return written


def load_segmentation_head(path: str) -> tuple[LinearSegmentationHead, dict]:
    state, meta = load_head_file(path, "segmentation")
    head = LinearSegmentationHead(state["conv.weight"].shape[1], meta["num_classes"])
    head.load_state_dict(state)
    return head.eval(), meta


def predict_segmentation(
    head: str,
    images: str,
    out: str = "out/predict-segmentation",
    model: str | None = None,
    batch_size: int = 16,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "bf16",
    scales: list[float] | None = None,
    flip: bool | None = None,
    image_size: int | None = None,
) -> str:
    """Apply a saved segmentation head to new images: class-index PNGs and coloured overlays.

    head: out/segmentation_head.safetensors of `dinokit eval segmentation`. images: a folder, an image
    or a list file. model: the backbone (default: the one the head was trained on; checked by hash).
    Writes out/<name>.png (class index per pixel, original size; the head's ignore_index never, when
    it is a class index) and out/<name>_overlay.png; <name> keeps the image's subfolders. A rerun into
    the same out first removes the earlier run's predictions (the files it listed in
    out/.dinokit-predictions.json; no other file), so out holds this run's alone.

    Or a released DINOv2 head: a name <dinov2_vit{s,b,l,g}14>_<ade20k|voc2012>_<linear|ms>_head
    (downloaded once, with its backbone), its .pth file, or any such .pth with model= its backbone.
    Applied as the released configs do (eval/released_segmentation.py): slide inference (linear heads
    512 x 512 windows, stride 341; ms heads 640 x 640, stride 320) on the image resized to the scale
    (4 x image_size, image_size) (ms: short side image_size, long side uncapped) x each ratio of scales,
    and its mirror image where flip; the views' softmax averaged. scales: default [1.0] for a linear
    head, the notebook's [1.0, 1.32, 1.73] for an ms one (the configs' evaluation, `eval segmentation
    head=`'s default: [1.0, 1.32, 1.73, 2.28, 3.0]); flip: default false / true; image_size: default
    512 / 640 (docs/reproducing.md).
    batch_size counts windows; num_workers is ignored (one image at a time). Writes out/classes.json
    too: the class names in index order (ADE20K's 150 or VOC2012's 21; null for an unnamed file
    without them) and the settings. scales, flip and image_size apply to released heads only.
    """
    out_dir = prepare_output(out, folder=True, create=False)  # a bad out= fails before any work
    from dinokit.eval.heads import is_released_head
    from dinokit.eval.released_segmentation import predict_released_segmentation

    if is_released_head(head, "segmentation"):
        return predict_released_segmentation(
            head, images, out_dir, model, scales, flip, image_size, batch_size, device, precision
        )
    refuse_released_settings(head, scales, flip, image_size)
    net, meta = load_segmentation_head(head)
    backbone = backbone_for_head(meta, model, device)
    net.to(resolve_device(device))
    count = 0
    ignore_index = meta.get("ignore_index", 255)
    for name, rgb, logits in predict_images(
        net, meta, backbone, images, (out_dir, (".png", "_overlay.png")), batch_size, num_workers, precision
    ):
        mask = predict_classes(logits, ignore_index).numpy()
        mask = mask.astype(np.uint8 if meta["num_classes"] <= 256 else np.uint16)
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / f"{name}.png", lambda tmp, m=mask: Image.fromarray(m).save(tmp, format="PNG"))
        overlay = (0.5 * rgb + 0.5 * colour_mask(mask, meta["num_classes"])).astype(np.uint8)
        save_panel(out_dir / f"{name}_overlay.png", [rgb, overlay])
        count += 1
    print(f"wrote {count} masks to {out_dir}")
    return str(out_dir)


def refuse_released_settings(head: str, scales: list[float] | None, flip: bool | None, image_size: int | None) -> None:
    """scales, flip and image_size set a released head's inference; a dinokit head file is refused them."""
    given = [k for k, v in (("scales", scales), ("flip", flip), ("image_size", image_size)) if v is not None]
    if given:
        raise DinokitError(
            f"{', '.join(given)} apply to the released DINOv2 heads only; {head} is a dinokit head file, applied "
            "at the image size and blocks it was trained with: leave them out"
        )
