"""The released DINOv2 depth heads (NYU Depth v2 / KITTI; linear, linear4 and DPT), without mmcv.

Meta released, per backbone dinov2_vit{s,b,l,g}14, heads `<backbone>_<nyu|kitti>_<linear|linear4|dpt>_head`
(`hub.released_head`). Applied as the official hub's depthers (`dinov2/hub/depthers.py`,
`dinov2/hub/depth/*`, `notebooks/depth_estimation.ipynb`) compute:
- the whole image at its own size, ImageNet-normalised, zero-padded to a multiple of the patch size
  (`CenterPadding`: `snap_to_patch_multiple(x, p, "pad")`);
- the backbone's blocks `depth_blocks` (ViT-S/B [2, 5, 8, 11], ViT-L [4, 11, 17, 23], ViT-g [9, 19, 29, 39];
  the last block alone for `linear`), patch maps and CLS tokens, without the final LayerNorm;
- linear / linear4: `LinearDepthHead` (BNHead: patch map + broadcast CLS per block, x4 bilinear, 1x1 conv
  to 256 bins, linear bin normalisation); dpt: `DPTDepthHead` below;
- the depth clamped to [min_depth, max_depth], then resized bilinearly to the image (unpadded).

One difference on purpose: an image of more than `max_pixels` (default 1 000 000) runs at the largest size
within them (aspect kept, PIL bilinear), its depth resized to the image's own size (the official
encode_decode's `size=`). The hub runs any size whole, and the memory grows with the pixel count (a DPT
head on ViT-S: about 2.2 GB per megapixel, so some 27 GB for a 4000 x 3000 photo); NYU's 640 x 480 and
KITTI's 1242 x 375 images are below the limit and run whole. `max_pixels=None` runs every image whole.

Depth ranges: NYU 0.001-10 m, KITTI 0.001-80 m, the datasets' (the released configs' decode_head max_depth,
and the hub's DPT depthers). The hub's *linear* depthers hard-code one range for every head: 10 m in one
version of dinov2/hub/depthers.py (so its KITTI linear depths are compressed 8-fold; `max_depth=10`
reproduces that), 80 m in another (which ignores the NYU range). Otherwise the differences are rounding:
ImageNet mean / std on [0, 1] pixels instead of the notebook's x255 then (123.675, ...) / (58.395, ...); the
linear head upsamples its logits instead of its features (`LinearDepthHead`); images are turned upright by
their EXIF orientation (as everywhere in dinokit; the notebook's PIL `open` is not).

`flip=True` (what `eval depth head=` uses) averages each depth with the mirror image's, flipped back, as the
released configs' test pipeline does (`MultiScaleFlipAug(img_scale=(480, 640), flip=True)` for NYU, no
resize; DepthEncoderDecoder.aug_test); `predict depth` follows the hub's notebook (no flip).

Verified, with the source: the hub code (facebookresearch/dinov2 dinov2/hub/depthers.py, depth/
decode_heads.py, depth/encoder_decoder.py): blocks, norm=False, CenterPadding, BNHead (UD bins, linear
norm, upsample 4, no BatchNorm), DPTHead (channels 256, post_process_channels [D/8, D/4, D/2, D], readout
"project", ConvModule's default ReLU after `project`), clamp then bilinear resize (align_corners False);
copies of the released configs: Meta's dinov2_vitl14_nyu_dpt_config.py (work_dir /checkpoint/dino/
evaluations/depth/dinov2_vitl14_nyu_dpt): backbone final_norm=False, out_indices [4, 11, 17, 23], DPTHead
channels 256, post_process_channels [128, 256, 512, 1024], readout_type "project", max_depth 10, test
flip=True, eigen_crop; Meta's dinov2_vits14_kitti_linear_config.py (work_dir /checkpoint/dino/evaluations/
depth/dinov2_vits14_kitti_linear, adapted by its copier: its in_channels / channels do not fit ViT-S):
final_norm=False, out_indices [11] (the last block), BNHead max_depth 80, test KBCrop then flip=True,
garg_crop; `eval depth head=` follows it (`head_scores.kb_crop`: image and ground truth cut to the bottom 352
rows and middle 1216 columns, garg of that), `predict depth` predicts whole images.
"""

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dinokit.errors import DinokitError
from dinokit.eval.common import Backbone, prepare_backbone
from dinokit.eval.depth import MAX_PIXELS, LinearDepthHead, depth_blocks
from dinokit.eval.heads import read_released_dense_head
from dinokit.models import VisionTransformer
from dinokit.models.vision_transformer import snap_to_patch_multiple
from dinokit.runtime import autocast, effective_precision

MIN_DEPTH = 0.001
DATASET_RANGES = {"nyu": (MIN_DEPTH, 10.0), "kitti": (MIN_DEPTH, 80.0)}  # metres


# ------------------------------------------------------------------------------------------ DPT head
class ConvUnit(nn.Module):
    """One convolution kept under `.conv`, as mmcv's ConvModule (no norm, no activation) names its weights."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convolutions without bias (DPT's pre-activation unit). The
    official unit applies its ReLUs in place, but on a clone-kept input: the residual is x before them."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvUnit(channels, channels, 3, padding=1, bias=False)
        self.conv2 = ConvUnit(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT's feature fusion: x + unit1(skip) (the skip resized bilinearly to x where their sizes differ),
    unit2, x2 bilinear (align_corners=True), 1x1 conv. The first block has no skip (no unit1)."""

    def __init__(self, channels: int, with_skip: bool) -> None:
        super().__init__()
        self.project = ConvUnit(channels, channels, 1)
        self.res_conv_unit1 = ResidualConvUnit(channels) if with_skip else None
        self.res_conv_unit2 = ResidualConvUnit(channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            if skip.shape != x.shape:
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.res_conv_unit1(skip)
        x = self.res_conv_unit2(x)
        return self.project(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class Reassemble(nn.Module):
    """4 blocks' tokens -> maps at 4x, 2x, 1x and 1/2 the patch grid with D/8, D/4, D/2, D channels. Per
    block: Linear(2D, D) + GELU on [token, CLS] ("project" readout), 1x1 conv to its channels, then a
    stride-4 and a stride-2 transposed conv, nothing, a stride-2 3x3 conv."""

    def __init__(self, dim: int, channels: list[int]) -> None:
        super().__init__()
        self.readout_projects = nn.ModuleList(nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU()) for _ in channels)
        self.projects = nn.ModuleList(ConvUnit(dim, c, 1) for c in channels)
        c0, c1, _, c3 = channels
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c0, c0, kernel_size=4, stride=4),
                nn.ConvTranspose2d(c1, c1, kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),
            ]
        )

    def forward(self, tokens: torch.Tensor, cls: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        b, _, _, d = tokens.shape
        maps = []
        for i, readout in enumerate(self.readout_projects):
            x = readout(torch.cat([tokens[:, i], cls[:, i, None].expand_as(tokens[:, i])], dim=-1))  # (B, N, D)
            maps.append(self.resize_layers[i](self.projects[i](x.transpose(1, 2).reshape(b, d, *grid))))
        return maps


class DepthOutput(nn.Module):
    """256 -> 128 (3x3), x2 bilinear (align_corners=True), -> 32 (3x3), ReLU, -> 1 (1x1): the hub's HeadDepth."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(channels // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class DPTDepthHead(nn.Module):
    """(B, 4, N, D) patch tokens + (B, 4, D) CLS of 4 blocks on an (h, w) grid -> depth (B, 1, 32 ceil(h/2),
    32 ceil(w/2)) >= min_depth: the released DPT head (the hub's DPTHead, readout "project", 256 channels).
    Reassembled maps -> 3x3 convs to 256 -> fusion from the coarsest map up, each finer map a skip -> 3x3
    conv + ReLU -> DepthOutput -> relu + min_depth. Its state-dict keys are the released files' without
    `decode_head.`."""

    def __init__(self, embed_dim: int, min_depth: float = MIN_DEPTH, channels: int = 256) -> None:
        super().__init__()
        widths = [embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        self.reassemble_blocks = Reassemble(embed_dim, widths)
        self.convs = nn.ModuleList(ConvUnit(c, channels, 3, padding=1, bias=False) for c in widths)
        self.fusion_blocks = nn.ModuleList(FusionBlock(channels, with_skip=i > 0) for i in range(4))
        self.project = ConvUnit(channels, channels, 3, padding=1)
        self.conv_depth = DepthOutput(channels)
        self.min_depth = min_depth

    def forward(self, tokens: torch.Tensor, cls: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        maps = [conv(x) for conv, x in zip(self.convs, self.reassemble_blocks(tokens, cls, grid), strict=True)]
        x = self.fusion_blocks[0](maps[3])
        for block, skip in zip(self.fusion_blocks[1:], maps[2::-1], strict=True):
            x = block(x, skip)
        x = F.relu(self.project(x))
        return F.relu(self.conv_depth(x)) + self.min_depth


# ----------------------------------------------------------------------------------- backbone + head
class ReleasedDepther(nn.Module):
    """A backbone and a released depth head, as the hub's DepthEncoderDecoder.whole_inference:
    ImageNet-normalised images (B, 3, H, W) -> depth in metres (B, 1, H, W) in [min_depth, max_depth].
    The backbone runs under `precision` (bf16 autocast, or fp32), the head in fp32. `predict` runs an
    image of more than `max_pixels` (None: no limit) shrunk to them, its depth at the image's size; with
    `flip`, the mean of its depth and its mirror image's depth flipped back (the released configs' test
    pipeline, MultiScaleFlipAug flip=True, through DepthEncoderDecoder.aug_test; the hub's notebook does not flip).
    loaded: the backbone as `prepare_backbone` loaded it (its source, description and weights hash), where known."""

    def __init__(
        self,
        backbone: VisionTransformer,
        head: nn.Module,
        blocks: tuple[int, ...],
        min_depth: float,
        max_depth: float,
        precision: str = "fp32",
        max_pixels: int | None = MAX_PIXELS,
        loaded: Backbone | None = None,
        flip: bool = False,
    ) -> None:
        super().__init__()
        self.backbone, self.head, self.blocks = backbone, head, tuple(blocks)
        self.min_depth, self.max_depth, self.precision = min_depth, max_depth, precision
        self.max_pixels, self.loaded, self.flip = max_pixels, loaded, flip

    def forward(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 1, *size) depths, size by default the images' (H, W) (the official encode_decode's `size`)."""
        padded = snap_to_patch_multiple(images, self.backbone.patch_size, "pad")
        with autocast(images.device, self.precision):
            layers = self.backbone.get_intermediate_layers(
                padded, n=list(self.blocks), return_class_token=True, norm=False
            )
        tokens = torch.stack([patches for patches, _ in layers], dim=1).float()  # (B, L, N, D)
        cls = torch.stack([c for _, c in layers], dim=1).float()  # (B, L, D)
        depth = self.head(tokens, cls, self.backbone.grid_size(*padded.shape[-2:]))
        depth = depth.clamp(self.min_depth, self.max_depth)
        return F.interpolate(depth, size=size or images.shape[-2:], mode="bilinear", align_corners=False)

    def run_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) `predict` runs a width x height image at: its own, or within `max_pixels`."""
        if self.max_pixels is None or width * height <= self.max_pixels:
            return width, height
        factor = math.sqrt(self.max_pixels / (width * height))
        return max(1, int(width * factor)), max(1, int(height * factor))

    @torch.inference_mode()
    def predict(self, image: str | Path | Image.Image) -> np.ndarray:
        """(H, W) float32 depth in metres of one image at its own size (a file is decoded upright, as RGB);
        an image of more than `max_pixels` runs shrunk to them (`run_size`); with `flip`, averaged with the
        mirror image's depth flipped back."""
        from dinokit.data.images import open_rgb, to_rgb
        from dinokit.data.transforms import normalize

        picture = open_rgb(image) if isinstance(image, (str, Path)) else to_rgb(image)
        size = self.run_size(*picture.size)
        run = picture if size == picture.size else picture.resize(size, Image.Resampling.BILINEAR)
        x = normalize()(run)[None].to(next(self.parameters()).device)
        depth = self(x, size=(picture.height, picture.width))
        if self.flip:  # aug_test: the views' depths (each clamped, resized and flipped back) averaged
            depth = (depth + self(x.flip(-1), size=(picture.height, picture.width)).flip(-1)) / 2
        return depth[0, 0].cpu().numpy()


# ------------------------------------------------------------------------------------------- loading
def build_head(state: dict[str, torch.Tensor], kind: str | None, dim: int, min_depth: float, max_depth: float):
    """(head module, its number of blocks) for `state` (`read_released_dense_head`) on a backbone of width `dim`:
    the kind the name says (linear: 1 block, linear4: 4, dpt), or where the name says none, the one its keys
    show. Raises ValueError listing the keys that are missing, unexpected or of another shape."""
    if kind == "dpt" or (kind is None and "conv_depth.weight" not in state):
        kind, head, layers, rename = "dpt", DPTDepthHead(dim, min_depth), 4, {}
    else:
        found = state.get("conv_depth.weight")
        blocks = found.shape[1] / (2 * dim) if found is not None and found.ndim == 4 else None
        layers = {"linear": 1, "linear4": 4}.get(kind, 1 if blocks == 1 else 4)  # unnamed: as its weight shows
        kind, head = "linear" if layers == 1 else "linear4", LinearDepthHead(dim, layers, min_depth, max_depth)
        rename = {"conv_depth.weight": "conv.weight", "conv_depth.bias": "conv.bias"}  # released -> LinearDepthHead
    own = head.state_dict()
    wanted = {released: own[mine] for released, mine in rename.items()} if rename else own
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    other = [
        f"{k} {tuple(state[k].shape)} (wanted {tuple(v.shape)})"
        for k, v in wanted.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or other:
        problems = [
            f"{what} {items[:5]}{' ...' if len(items) > 5 else ''}"
            for what, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", other))
            if items
        ]
        raise ValueError(f"{kind} head keys " + "; ".join(problems))
    loaded = {rename.get(k, k): v for k, v in state.items()}
    head.load_state_dict({**head.state_dict(), **loaded})
    return head.eval(), layers


def depth_range(dataset: str | None, max_depth: float | None, head: str) -> tuple[float, float]:
    """(min_depth, max_depth) in metres: `max_depth` where given, else the dataset's the name says."""
    if max_depth is not None:
        if not max_depth > MIN_DEPTH:
            raise DinokitError(f"max_depth must be > {MIN_DEPTH} m (the heads' min_depth), got {max_depth}")
        return MIN_DEPTH, float(max_depth)
    if dataset is None:
        raise DinokitError(
            f"{head}: its name does not say the dataset the head was trained on (..._nyu_... or ..._kitti_...), "
            "which sets its depth range: pass max_depth=10 (NYU Depth v2) or max_depth=80 (KITTI)"
        )
    return DATASET_RANGES[dataset]


def load_released_depth_head(
    head: str,
    model: str | None = None,
    device: str = "auto",
    max_depth: float | None = None,
    precision: str = "fp32",
    max_pixels: int | None = MAX_PIXELS,
    flip: bool = False,
) -> ReleasedDepther:
    """A released DINOv2 depth head with its backbone, ready for images (`ReleasedDepther`, `.predict(image)`
    -> (H, W) metres). head: a released name such as dinov2_vits14_nyu_linear4_head or dinov2_vitl14_kitti_dpt_head
    (downloaded once into the cache), or its .pth file. model: the backbone; by default the released
    one the name says (a backbone of another width, depth or patch is refused). max_depth: the depth range's
    top in metres; by default the dataset's (NYU 10, KITTI 80). precision: the backbone's, fp32 or bf16.
    max_pixels: larger images run shrunk to this many pixels (memory; None: every image whole, as the hub).
    flip: average each depth with the mirror image's, as the released configs' evaluation (`eval depth head=`
    does; `predict depth` follows the hub, no flip)."""
    from dinokit.eval.heads import check_released_backbone, locate_released_head, released_head_of
    from dinokit.runtime import resolve_device

    effective_precision(resolve_device(device), precision)  # a bad precision= fails before any download
    if max_pixels is not None and not (isinstance(max_pixels, int) and max_pixels >= 1):
        raise DinokitError(f"max_pixels must be a positive number of pixels, or None for no limit; got {max_pixels!r}")
    name = released_head_of(head, "depth")
    min_depth, top = depth_range(name.dataset if name is not None else None, max_depth, str(head))
    path, model, name = locate_released_head(str(head), model, "depth", "dinov2_vits14_nyu_linear4_head")
    state, _ = read_released_dense_head(path, "depth", "dinov2_vits14_nyu_linear4_head")
    if "conv_seg.weight" in state:  # mmseg's BNHead: not a backbone mismatch, whatever model= is
        raise DinokitError(
            f"{path} is a DINOv2 segmentation head (decode_head.bn / conv_seg), not a depth head: use "
            f"`dinokit predict segmentation head={head}`"
        )
    state = {k: v.float() for k, v in state.items()}
    backbone = prepare_backbone(model, device, 0)
    released = name.backbone if name is not None else None
    check_released_backbone(str(head), model, backbone, released)
    net = backbone.model
    try:
        depth_head, layers = build_head(state, name.kind if name is not None else None, net.embed_dim, min_depth, top)
    except ValueError as e:
        expected = released or f"model={model}"
        raise DinokitError(
            f"{path} does not fit a DINOv2 depth head on {expected} (width {net.embed_dim}, {len(net.blocks)} "
            f"blocks): {e}. Pass the backbone the head was released with as model=..."
        ) from None
    blocks = depth_blocks(len(net.blocks), layers)
    head_on_device = depth_head.to(next(net.parameters()).device)
    return ReleasedDepther(net, head_on_device, blocks, min_depth, top, precision, max_pixels, backbone, flip)


def released_depth_maps(
    depther: ReleasedDepther, images: str, out_files
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield (output name, RGB array, (H, W) depth in metres) per readable image of `images`, one image at a
    time at its own size; the output folder is held as `dense.predict_images` holds it."""
    from dinokit.eval.dense import picture_outputs, prediction_files

    with prediction_files(images, out_files) as (paths, names):
        bad: list[int] = []
        shrunk = 0
        for i, rgb, depth in picture_outputs(paths, depther.predict, bad, desc="depth"):
            size = (rgb.shape[1], rgb.shape[0])  # (width, height), as PIL's
            shrunk += depther.run_size(*size) != size
            yield names[i], rgb, depth
        if bad:
            print(f"skipped {len(bad)} unreadable image(s), e.g. {paths[bad[0]]}")
        if shrunk:
            print(
                f"{shrunk} image(s) of more than {depther.max_pixels} pixels ran shrunk to them (memory), their depths "
                "resized to the images' sizes; max_pixels=none runs them whole"
            )
