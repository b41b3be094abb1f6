"""The released DINOv2 semantic-segmentation heads, applied as the official evaluation does, without
mmcv / mmseg: `dinokit predict segmentation head=dinov2_vits14_ade20k_linear_head`.

Meta released per backbone dinov2_vit{s,b,l,g}14 a head `<backbone>_<ade20k|voc2012>_<linear|ms>_head.pth`
(an mmcv checkpoint: `state_dict` with `decode_head.bn.*` and `decode_head.conv_seg.*`) and its mmseg config
`..._config.py`. The head is mmseg's `BNHead`, dinokit's `LinearSegmentationHead`: BatchNorm (running
statistics) and a 1x1 conv on the normed patch tokens of the last block ("linear", D channels) or of the
last 4 blocks concatenated ("ms", 4D). The computation follows DINOv2's semantic_segmentation notebook and
mmseg 0.x's `EncoderDecoder` with the test pipeline and test_cfg of the released configs:

- the image (RGB, 0-255) resized keeping its aspect ratio to mmseg's img_scale x each ratio r of `scales`
  (mmcv `imrescale`): linear heads (4 S r, S r), S = image_size = 512 (img_scale (2048, 512)); ms heads
  (99999999 r, S r), S = 640 (img_scale (99999999, 640): the short side alone binds); flipped horizontally
  too where `flip`; bilinear, rounded to 8 bits, close to cv2's resize, not bit-equal;
- normalised with ImageNet's mean and std on 0-255;
- slide inference: crop x crop windows every `stride` pixels (linear 512 / 341, ms 640 / 320), each
  zero-padded to a patch multiple (the official CenterPadding), its logits on the patch grid resized
  bilinearly to the window; the windows' logits averaged where they overlap;
- each view's logits resized bilinearly to the original size, softmaxed, flipped back; the views'
  probabilities averaged; class = argmax.

Verified, with the source: the head's layout and computation (dinov2 `eval/segmentation/models/
decode_heads/linear_head.py`, the notebook's printed module: conv_seg (21, 1536) for ViT-S/14 ms, i.e. 4 x
384); the backbone call (notebook `create_segmenter`: `get_intermediate_layers(n=out_indices,
reshape=True)`, norm left at its default True; CenterPadding); the ms configs (a copy of Meta's
`dinov2_vits14_voc2012_ms_config.py`, work_dir /checkpoint/dino/evaluations/segmentation/..., in
w1394945493/GaussTR configs/dinov2/dinov2_vits14/): out_indices [8, 9, 10, 11] with in_index [0, 1, 2, 3],
test_cfg slide crop_size (640, 640) stride (320, 320), data.test img_scale (99999999, 640), img_ratios
[1.0, 1.32, 1.73, 2.28, 3.0], flip=True; the notebook keeps the first HEAD_SCALE_COUNT = 3 ratios, as
`predict segmentation` does by default (`DEFAULT_SCALES`), while `eval segmentation head=` scores with the
configs' 5 (`SCORING_SCALES`: those of the published "+ms" numbers). The linear
configs, from adapted copies (Jiawei-Yang/Denoising-ViT evaluation/configs/vitb_voc2012_linear_config.py and
an ADE20K twin): out_indices [8, 9, 10, 11] with in_index [3] (the last block), img_scale (2048, 512), no
flip, slide crop (512, 512) stride (341, 341). Not verified: the ADE20K ms config itself (taken to be the
VOC2012 one's protocol, as the paper describes one "+ms" protocol), and the long side of the linear
configs' img_scale in Meta's own files (one of Meta's ADE20K configs trains at (99999999, 512); the test
pipeline of that file was not found): 2048 and 99999999 differ only for images more than 4 times as wide
as high.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinokit.errors import DinokitError
from dinokit.eval.common import Backbone, prepare_backbone
from dinokit.eval.dense import upsample
from dinokit.eval.heads import read_released_dense_head
from dinokit.eval.segmentation import LinearSegmentationHead
from dinokit.eval.segmentation_classes import DATASET_CLASSES
from dinokit.models.vision_transformer import snap_to_patch_multiple
from dinokit.runtime import autocast, check_precision

DEFAULT_SCALES = {"linear": (1.0,), "ms": (1.0, 1.32, 1.73)}  # ms: the notebook's HEAD_SCALE_COUNT = 3
# eval segmentation head=: the configs' protocol; ms: their img_ratios (the published "+ms" numbers)
SCORING_SCALES = {"linear": (1.0,), "ms": (1.0, 1.32, 1.73, 2.28, 3.0)}
DEFAULT_IMAGE_SIZE = {"linear": 512, "ms": 640}  # the short side of the configs' img_scale
UNCAPPED = 99999999  # the long side of the ms configs' img_scale (99999999, 640): no cap
WINDOWS = {"linear": (512, 341), "ms": (640, 320)}  # the configs' test_cfg crop_size and stride
BLOCKS = {"linear": 1, "ms": 4}  # the last block, or the last 4 concatenated on channels
# mmseg's Normalize on 0-255, (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375): ImageNet's x 255
MEAN, STD = tuple(255 * m for m in IMAGENET_MEAN), tuple(255 * s for s in IMAGENET_STD)
IMAGE_SIZE, (CROP, STRIDE) = DEFAULT_IMAGE_SIZE["linear"], WINDOWS["linear"]
HEAD_KEYS = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "conv_seg.weight", "conv_seg.bias")


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class ReleasedHead:
    """A released head ready to apply: the module, its backbone, how many last blocks feed it, its
    kind ("linear" or "ms", from the name or from its width) and its class names (None if unknown)."""

    head: LinearSegmentationHead
    backbone: Backbone
    blocks: int
    kind: str
    classes: list[str] | None
    path: Path

    def settings(
        self,
        scales: list[float] | None = None,
        flip: bool | None = None,
        image_size: int | None = None,
        batch_size: int = 16,
        precision: str = "bf16",
        scoring: bool = False,
    ) -> "InferenceSettings":
        """The official test-time settings of this head's kind (linear: one scale, img_scale (4 x 512, 512),
        windows 512 / 341; ms: ratios and flips, img_scale (uncapped, 640), windows 640 / 320), with the
        values given in their place. The ms ratios: the notebook's 3 (`DEFAULT_SCALES`, for a picture), or
        with `scoring` the configs' 5 (`SCORING_SCALES`, the published "+ms" numbers' evaluation)."""
        check_settings(scales, flip, image_size, batch_size, precision)
        crop, stride = WINDOWS[self.kind]
        default_scales = (SCORING_SCALES if scoring else DEFAULT_SCALES)[self.kind]
        settings = InferenceSettings(
            scales=tuple(default_scales if scales is None else scales),
            flip=self.kind == "ms" if flip is None else flip,
            image_size=DEFAULT_IMAGE_SIZE[self.kind] if image_size is None else image_size,
            long_side=UNCAPPED if self.kind == "ms" else None,
            crop=crop,
            stride=stride,
            batch_size=batch_size,
            precision=precision,
        )
        if any(short < 1 for _, short in settings.img_scales()):
            raise DinokitError(
                f"scales={list(settings.scales)} x image_size={settings.image_size} make a scale below 1 px"
            )
        return settings

    def predict(self, image: str | Path | Image.Image, **settings) -> np.ndarray:
        """(H, W) int64 class index per pixel of one image at its own size (a file is decoded upright, as
        RGB); settings: those of `settings` (scales, flip, image_size, batch_size, precision)."""
        from dinokit.data.images import open_rgb, to_rgb

        picture = open_rgb(image) if isinstance(image, (str, Path)) else to_rgb(image)
        return self.segment(picture, self.settings(**settings))

    def segment(self, picture: Image.Image, settings: "InferenceSettings") -> np.ndarray:
        """(H, W) int64 class index per pixel of an RGB picture (`segment_image` with `settings`)."""
        x = torch.from_numpy(np.array(picture)).permute(2, 0, 1).to(next(self.head.parameters()).device)
        with torch.no_grad():
            return segment_image(self, x, settings).numpy()


def load_released_segmentation_head(head: str, model: str | None = None, device: str = "auto") -> ReleasedHead:
    """A released DINOv2 segmentation head with its backbone (`ReleasedHead`, `.predict(image)` -> (H, W)
    classes, `.classes` their names): a released name such as dinov2_vits14_ade20k_ms_head (downloaded
    once into the cache) or its .pth file. model: its backbone, by default the released one its name
    says (one of another width, depth, patch or registers is refused)."""
    from dinokit.eval.heads import check_released_backbone, locate_released_head

    path, model, name = locate_released_head(head, model, "segmentation", "dinov2_vits14_ade20k_linear_head")
    state, meta = read_head_file(path)
    backbone = prepare_backbone(model, device, 0)
    check_released_backbone(head, model, backbone, name.backbone if name is not None else None)
    dim, depth = backbone.model.embed_dim, len(backbone.model.blocks)
    classes_count, width = state["conv_seg.weight"].shape[:2]
    kinds = [k for k, n in BLOCKS.items() if n * dim == width and (name is None or name.kind == k)]
    if not kinds or BLOCKS[kinds[0]] > depth:
        expected = f"{BLOCKS[name.kind] * dim}" if name is not None else f"{dim} (linear) or {4 * dim} (ms)"
        raise DinokitError(
            f"{path} takes {width} feature channels, but model={model} (embed dim {dim}, {depth} blocks) gives "
            f"{expected}: pass the backbone the head was released with as model=..."
        )
    net = LinearSegmentationHead(width, classes_count)
    tensors = {k: v for k, v in state.items() if k.startswith("bn.")}
    tensors.setdefault("bn.num_batches_tracked", torch.tensor(0))  # unused in eval; not every file keeps it
    net.load_state_dict(tensors | {"conv.weight": state["conv_seg.weight"], "conv.bias": state["conv_seg.bias"]})
    dataset = DATASET_CLASSES.get(name.dataset) if name is not None else None
    recorded = (meta or {}).get("CLASSES")
    if isinstance(recorded, (list, tuple)) and len(recorded) == classes_count:
        classes = [str(c).strip() for c in recorded]
    elif dataset is not None and len(dataset) == classes_count:
        classes = list(dataset)
    else:
        classes = None
    device_of = next(backbone.model.parameters()).device
    return ReleasedHead(net.to(device_of).eval(), backbone, BLOCKS[kinds[0]], kinds[0], classes, path)


def read_head_file(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """({bn.* / conv_seg.*: tensor}, the checkpoint's meta dict or None) of a released segmentation head
    (`read_released_dense_head`), checked to be a BatchNorm + 1x1 conv (mmseg's BNHead)."""
    found, meta = read_released_dense_head(path, "segmentation", "dinov2_vits14_ade20k_linear_head")
    missing = [k for k in HEAD_KEYS if not isinstance(found.get(k), torch.Tensor)]
    if missing:
        depth_head = any(k.startswith("conv_depth.") for k in found)
        depth = " (a depth head: use `dinokit predict depth`)" if depth_head else ""
        raise DinokitError(
            f"{path} is not a DINOv2 segmentation head: its decode_head holds {sorted(found)[:6]}, a released "
            f"segmentation head bn.* and conv_seg.*{depth}. Pass a released head (e.g. "
            "dinov2_vits14_ade20k_linear_head) or a dinokit head file (eval segmentation writes one)"
        )
    weight = found["conv_seg.weight"]
    width = weight.shape[1] if weight.dim() == 4 else None
    shapes_fit = (
        weight.dim() == 4
        and weight.shape[2:] == (1, 1)
        and found["conv_seg.bias"].shape == weight.shape[:1]
        and all(found[k].shape == (width,) for k in HEAD_KEYS if k.startswith("bn."))
    )
    if not shapes_fit:
        shapes = ", ".join(f"{k} {tuple(found[k].shape)}" for k in HEAD_KEYS)
        raise DinokitError(
            f"{path} is not a DINOv2 segmentation head: its tensors do not fit a BatchNorm + 1x1 conv ({shapes})"
        )
    tensors = {k: found[k].float() for k in HEAD_KEYS}
    if isinstance(found.get("bn.num_batches_tracked"), torch.Tensor):
        tensors["bn.num_batches_tracked"] = found["bn.num_batches_tracked"]
    return tensors, meta


# -------------------------------------------------------------------------------------------- inference
@dataclass(frozen=True)
class InferenceSettings:
    """mmseg's test pipeline and test_cfg as DINOv2's configs set them: the ratios of the img_scale
    (long_side, image_size), horizontal flips, slide windows; and how dinokit runs them. long_side None:
    4 x image_size (the linear configs' (2048, 512)); the ms configs' is UNCAPPED."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    image_size: int = IMAGE_SIZE
    long_side: int | None = None
    crop: int = CROP
    stride: int = STRIDE
    batch_size: int = 16  # windows per forward pass
    precision: str = "bf16"

    def view_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(h, w) of the resized image of each view (flipped views repeat their scale's)."""
        sizes = [rescale_size(height, width, scale) for scale in self.img_scales()]
        return [size for size in sizes for _ in range(2 if self.flip else 1)]

    def img_scales(self) -> list[tuple[int, int]]:
        """(long, short) target scale per ratio (`view_scales`)."""
        return view_scales(self.image_size, self.scales, self.long_side)


def view_scales(image_size: int, scales: tuple[float, ...], long_side: int | None = None) -> list[tuple[int, int]]:
    """(long, short) target scale per ratio r, as mmseg's MultiScaleFlipAug: (int(L r), int(S r)) for the
    img_scale (L, S) = (long_side, image_size), L = 4 S where long_side is None."""
    long_side = 4 * image_size if long_side is None else long_side
    return [(int(long_side * r), int(image_size * r)) for r in scales]


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an image resized keeping its aspect ratio to fit `scale` (long, short), as mmcv's
    imrescale: factor min(long / long side, short / short side), each side int(side * factor + 0.5)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))  # mmcv: 0 for 1 x 5000 px


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of mmseg's slide inference windows over a height x width image: a grid every
    `stride` pixels, the last window of each row / column moved back inside the image; all windows have
    the size (min(crop, height), min(crop, width))."""

    def spans(size: int) -> list[tuple[int, int]]:
        out = []
        for i in range(max(size - crop + stride - 1, 0) // stride + 1):
            end = min(i * stride + crop, size)
            out.append((max(end - crop, 0), end))
        return out

    return [(y1, y2, x1, x2) for y1, y2 in spans(height) for x1, x2 in spans(width)]


def window_logits(released: ReleasedHead, crops: torch.Tensor, precision: str) -> torch.Tensor:
    """The head's logits on the patch grid of (B, 3, h, w) normalised crops, each zero-padded to a
    patch multiple (CenterPadding): normed patch tokens of its blocks -> BatchNorm -> 1x1 conv,
    (B, C, h', w'). mmseg's encode_decode then resizes them to (h, w)."""
    model = released.backbone.model
    x = snap_to_patch_multiple(crops, model.patch_size, "pad")
    depth = len(model.blocks)
    with autocast(x.device, precision):
        tokens = model.get_intermediate_layers(x, n=list(range(depth - released.blocks, depth)), norm=True)
    grid = (x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size)
    return released.head(torch.stack([t.float() for t in tokens], dim=1), None, grid)


def slide_logits(
    released: ReleasedHead, image: torch.Tensor, settings: InferenceSettings, mirrored: bool = False
) -> torch.Tensor:
    """(C, H, W) logits of a (3, H, W) normalised image: each window's logits resized to the window,
    averaged where windows overlap. mirrored: the image is a mirror image, and each window's logits go
    flipped into the mirrored columns: the map of the unmirrored image, as the whole map flipped back (the
    same values), without a second (C, H, W) map."""
    _, height, width = image.shape
    windows = slide_windows(height, width, settings.crop, settings.stride)
    total = None
    count = torch.zeros(1, height, width, device=image.device)
    for start in range(0, len(windows), settings.batch_size):
        chunk = windows[start : start + settings.batch_size]
        crops = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        logits = window_logits(released, crops, settings.precision)
        if total is None:
            total = logits.new_zeros(logits.shape[1], height, width)
        for (y1, y2, x1, x2), out in zip(chunk, logits, strict=True):  # one window at full size at a time
            window = upsample(out[None], (y2 - y1, x2 - x1))[0]
            if mirrored:
                x1, x2, window = width - x2, width - x1, window.flip(-1)
            total[:, y1:y2, x1:x2] += window
            count[:, y1:y2, x1:x2] += 1
    return total.div_(count)  # in place: one (C, H, W) map at a time (150 x 1920 x 2560 is 2.9 GB)


def resize_rgb(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) 0-255 image -> (3, h, w) bilinear (align_corners False, no antialias) rounded to 8-bit
    values, as cv2.resize of a uint8 image (close, not bit-equal: cv2 uses fixed-point weights)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.float()
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=False)
    return resized[0].round().clamp(0, 255)


def iter_views(released: ReleasedHead, image: torch.Tensor, settings: InferenceSettings) -> Iterator[torch.Tensor]:
    """Slide-inference logits (C, h, w) of each view of a (3, H, W) 0-255 RGB image, in the order of
    `settings.view_sizes`: per ratio, the image resized, then (with flip) its mirror image, whose logits
    are flipped back (`slide_logits(mirrored=True)`). No view's logits are held here once it is yielded
    and the caller moves on, so a caller that drops each view keeps one large map alive at a time."""
    mean = torch.tensor(MEAN, device=image.device)[:, None, None]
    std = torch.tensor(STD, device=image.device)[:, None, None]
    for scale in settings.img_scales():
        resized = resize_rgb(image, rescale_size(*image.shape[-2:], scale))
        for flipped in (False, True) if settings.flip else (False,):
            x = (resized.flip(-1) if flipped else resized).sub(mean).div(std)
            yield slide_logits(released, x, settings, mirrored=flipped)


def mean_probabilities(views: list[torch.Tensor], size: tuple[int, int], rows: slice | None = None) -> torch.Tensor:
    """Rows `rows` (default all) of the mean over `views` of softmax(each view's logits resized bilinearly
    to `size`): (C, rows, W). The resizing samples only those rows (grid_sample at the points bilinear
    interpolation with align_corners=False samples), so a large image can be done a band at a time."""
    height, width = size
    rows = rows or slice(0, height)
    device = views[0].device
    ys = (2 * torch.arange(rows.start, rows.stop, device=device, dtype=torch.float32) + 1) / height - 1
    xs = (2 * torch.arange(width, device=device, dtype=torch.float32) + 1) / width - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # (1, rows, W, 2) of (x, y)
    total = None
    for logits in views:
        if tuple(logits.shape[-2:]) == (height, width):  # no resizing (the grid would round)
            resized = logits[:, rows]
        else:
            resized = F.grid_sample(logits[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        probs = resized.softmax(dim=0)
        total = probs if total is None else total + probs
    return total / len(views)


def segment_image(
    released: ReleasedHead,
    image: torch.Tensor,
    settings: InferenceSettings,
    keep_views: bool | None = None,
    band_bytes: int = 2**26,
) -> torch.Tensor:
    """(H, W) class per pixel of a (3, H, W) 0-255 RGB image: argmax of the views' mean probabilities.

    Memory: either every view's logits are kept and the probabilities made a band of rows (about
    `band_bytes`) at a time, or each view's probabilities are added into a (C, H, W) sum as it comes;
    `keep_views` None takes the smaller (the sum for several views of more pixels than the image)."""
    height, width = image.shape[-2:]
    num_classes = len(released.head.conv.bias)
    step = max(1, band_bytes // (4 * num_classes * width))
    bands = [slice(y, min(y + step, height)) for y in range(0, height, step)]
    sizes = settings.view_sizes(height, width)
    if keep_views is None:
        keep_views = len(sizes) == 1 or height * width > sum(h * w for h, w in sizes)
    if keep_views:
        views = list(iter_views(released, image, settings))
        return torch.cat([mean_probabilities(views, (height, width), band).argmax(0) for band in bands]).cpu()
    total = None
    for logits in iter_views(released, image, settings):
        if total is None:
            total = logits.new_zeros(num_classes, height, width)
        for band in bands:
            total[:, band] += mean_probabilities([logits], (height, width), band)
        del logits  # before iter_views makes the next view
    return total.argmax(0).cpu()


# ------------------------------------------------------------------------------------------- command
def predict_released_segmentation(
    head: str,
    images: str,
    out_dir: Path,
    model: str | None,
    scales: list[float] | None,
    flip: bool | None,
    image_size: int | None,
    batch_size: int,
    device: str,
    precision: str,
) -> str:
    """`dinokit predict segmentation` with a released head (see predict_segmentation): one image at a
    time, writing <name>.png, <name>_overlay.png and classes.json."""
    from dinokit.eval.dense import picture_outputs, prediction_files
    from dinokit.eval.visualize import colour_mask, save_panel
    from dinokit.io import atomic_write, write_json

    check_settings(scales, flip, image_size, batch_size, precision)  # before any download
    released = load_released_segmentation_head(head, model, device)
    settings = released.settings(scales, flip, image_size, batch_size, precision)
    num_classes = len(released.head.conv.bias)
    record = {
        "head": str(released.path),
        "model": released.backbone.source,
        "kind": released.kind,
        "scales": list(settings.scales),
        "flip": settings.flip,
        "image_size": settings.image_size,
        "img_scale": list(view_scales(settings.image_size, (1.0,), settings.long_side)[0]),
        "crop": settings.crop,
        "stride": settings.stride,
        "num_classes": num_classes,
        "classes": released.classes,
    }
    count, bad = 0, []
    files = (out_dir, (".png", "_overlay.png"))
    with prediction_files(images, files, once=("classes.json",)) as (paths, names):
        write_json(out_dir / "classes.json", record)
        segment = partial(released.segment, settings=settings)
        for i, rgb, classes in picture_outputs(paths, segment, bad, desc="segmentation"):
            name = names[i]
            mask = classes.astype(np.uint8 if num_classes <= 256 else np.uint16)
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out_dir / f"{name}.png", lambda tmp, m=mask: Image.fromarray(m).save(tmp, format="PNG"))
            overlay = (0.5 * rgb + 0.5 * colour_mask(mask, num_classes)).astype(np.uint8)
            save_panel(out_dir / f"{name}_overlay.png", [rgb, overlay])
            count += 1
    if bad:
        print(f"skipped {len(bad)} unreadable image(s), e.g. {paths[bad[0]]}")
    known = f"class names in {out_dir / 'classes.json'}" if released.classes else "class names unknown"
    print(f"wrote {count} masks to {out_dir} (released {released.kind} head, {num_classes} classes; {known})")
    return str(out_dir)


def check_settings(
    scales: list[float] | None, flip: bool | None, image_size: int | None, batch_size: int, precision: str
) -> None:
    """Refuse, before any work, settings that segment nothing."""
    check_precision(precision)
    if scales is not None and (not scales or not all(isinstance(r, (int, float)) and r > 0 for r in scales)):
        raise DinokitError(f"scales must be a list of positive ratios such as [1.0, 1.32, 1.73], got {scales}")
    if flip is not None and not isinstance(flip, bool):
        raise DinokitError(f"flip must be true or false, got {flip!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DinokitError(
            "image_size must be a positive number of pixels (the short side; by default 512 for linear heads, "
            f"640 for ms ones), got {image_size}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DinokitError(f"batch_size must be >= 1 (windows per forward pass), got {batch_size}")
