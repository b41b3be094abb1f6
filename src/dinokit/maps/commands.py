"""The picture commands: `dinokit visualize attention | pca | similarity | matches` and `dinokit segment`.

Each loads a model, reads the images whole (resize_policy 'aspect': short side = image_size, long
side the nearest multiple of the patch size; or 'resize' to exactly image_size), computes the arrays
with the functions of this folder, and writes PNGs. `model=` is read as the eval commands read it
(`dinokit.eval.backbone`: files, run folders, released names, `random:<arch>`). Maps from a randomly
initialised model mean nothing (their pictures say so): pass released weights (the default,
`dinov2_vits14`, is downloaded once) or your checkpoint.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinokit.data.images import (
    CLASS_INDEX_MODES,
    UnreadableImage,
    list_images,
    open_image,
    open_images,
    open_rgb,
    output_names,
    same_aspect,
)
from dinokit.errors import DinokitError
from dinokit.eval.backbone import RANDOM_PREFIX, is_random_source, load_backbone
from dinokit.io import (
    prepare_output,
    refuse_files_no_run_wrote,
    refuse_inputs_as_outputs,
    refuse_other_outputs,
    refuse_overwriting_inputs,
    write_json,
)
from dinokit.maps.attention import attention_maps
from dinokit.maps.matching import best_match_similarity, check_options, cosine_matrix, match_patches
from dinokit.maps.pca import patch_features, pca_rgb
from dinokit.maps.render import (
    colorize,
    mask_overlay,
    matches_figure,
    overlay,
    panel_figure,
    readable_norm,
    save_figure,
    save_png,
    shrink,
    upsample,
)
from dinokit.maps.segment import check_threshold, segment_features
from dinokit.maps.similarity import patch_similarity, patch_to_pixel, pixel_to_patch
from dinokit.models import VisionTransformer
from dinokit.runtime import resolve_device

DRAWN_SIDE = 1600  # the long side, in pixels, at which the pictures draw a photo (figures are ~800 px wide)


def model_input(model: VisionTransformer, image, image_size: int, resize_policy: str = "aspect") -> torch.Tensor:
    """(3, H, W) input for `model` from a path or PIL image, the whole image (no crop)."""
    from dinokit.data.transforms import check_image_size, eval_transform  # torchvision: not for `--help`

    if resize_policy not in ("aspect", "resize"):
        raise DinokitError(f"maps use the whole image: resize_policy must be aspect or resize, got {resize_policy!r}")
    check_image_size(image_size, model.patch_size)  # its error names the nearest valid sizes
    picture = open_rgb(image) if isinstance(image, (str, Path)) else image
    device = next(model.parameters()).device
    # no ReducedJpegDecode: the picture is decoded whole here (it is drawn too)
    transform = eval_transform(image_size, resize_policy, patch_size=model.patch_size, reduced_decode=False)
    return transform(picture).to(device)


def load(model: str, device: str) -> VisionTransformer:
    """The network of `model=`, as the eval commands read it (`dinokit.eval.backbone.load_backbone`):
    a file or folder of any format, a pretraining run folder, a released name, or `random:<arch>` (a
    seeded random init, with a note that its maps mean nothing)."""
    net, _ = load_backbone(model, resolve_device(device))
    if is_random_source(model):
        print(f"note: model={model} is a randomly initialised network: its maps show nothing about the images")
    return net


def label(model: str) -> str:
    """How a picture names its model: the file name of a path, the released name, or for a random init
    its architecture and that its maps are meaningless."""
    if is_random_source(model):
        return f"{str(model).removeprefix(RANDOM_PREFIX)} RANDOM INIT (meaningless maps)"
    return Path(model).name if Path(model).exists() else model


def heat_overlay(rgb: np.ndarray, patch_map: np.ndarray, scale: tuple[float, float] | None = None) -> np.ndarray:
    """A patch map upsampled (bilinear) to the photo, coloured (from its own min..max, or `scale` (lo, hi))
    and blended over it."""
    lo, hi = (None, None) if scale is None else scale
    return overlay(rgb, colorize(upsample(patch_map, rgb.shape[:2]), vmin=lo, vmax=hi), alpha=0.6)


def joint_heat_overlays(
    rgbs: list[np.ndarray], patch_maps: list[np.ndarray]
) -> tuple[list[np.ndarray], tuple[float, float]]:
    """Each patch map over its photo on ONE colour scale, (lo, hi) = the min and max over all the maps,
    widened as the colour bar is (`readable_norm`), and returned for it: the same colour is the same
    value in every picture and on the bar."""
    norm = readable_norm(min(float(m.min()) for m in patch_maps), max(float(m.max()) for m in patch_maps))
    scale = (float(norm.vmin), float(norm.vmax))
    return [heat_overlay(rgb, m, scale=scale) for rgb, m in zip(rgbs, patch_maps, strict=True)], scale


def visualize_attention(
    image: str,
    out: str,
    model: str = "dinov2_vits14",
    image_size: int = 448,
    resize_policy: str = "aspect",
    mass: float = 0.6,
    device: str = "auto",
) -> dict:
    """CLS attention of the last block as PNG: per head, mean, DINO's mass maps, registers apart.

    The maps are overlaid on the photo; the thresholded maps show the patches holding `mass` of each
    head's attention; for register models each register's share of the CLS attention and its own
    map are shown separately (registers are left out of the maps).

    Writes the PNG `out`; returns the attention shares.
    """
    if not 0 < mass <= 1:
        raise DinokitError(f"mass must be a share between 0 and 1 (e.g. 0.6 for 60%), got {mass}")
    out = str(prepare_output(out, example="attention.png", create=False, suffix=".png"))  # "~/..." expanded
    refuse_inputs_as_outputs({"out": out}, [image])
    picture = open_rgb(image)  # decoded once, for the model and the picture
    net = load(model, device)
    x = model_input(net, picture, image_size, resize_policy)
    maps = attention_maps(net, x, mass=mass)
    rgb = shrink(np.asarray(picture), DRAWN_SIDE)
    panels = [("image", rgb), ("mean over heads", heat_overlay(rgb, maps["mean"]))]
    panels += [(f"head {i}", heat_overlay(rgb, m)) for i, m in enumerate(maps["per_head"])]
    masks = maps["mass_masks"]
    panels += [
        (f"head {i}: {mass:.0%} of mass", mask_overlay(rgb, upsample(m, rgb.shape[:2], "nearest") > 0.5))
        for i, m in enumerate(masks)
    ]
    to_registers = maps["cls_to_registers"].mean(0)
    panels += [
        (f"register {r} (CLS gives it {share:.1%})", heat_overlay(rgb, m))
        for r, (share, m) in enumerate(zip(to_registers, maps["registers_to_patches"], strict=True))
    ]
    title = f"{label(model)} at {tuple(x.shape[-2:])}: CLS attention to patches, registers excluded"
    save_figure(out, panel_figure(panels, columns=max(4, len(maps["per_head"])), title=title))
    return {
        "out": out,
        "grid": list(maps["mean"].shape),
        "cls_to_patches": float(maps["per_head"].sum(axis=(1, 2)).mean()),
        "cls_to_cls": float(maps["cls_to_cls"].mean()),
        "cls_to_registers": [float(v) for v in to_registers],
    }


def visualize_pca(
    image: str,
    out: str,
    model: str = "dinov2_vits14",
    image_size: int = 448,
    resize_policy: str = "aspect",
    foreground_threshold: float | None = None,
    device: str = "auto",
) -> dict:
    """Patch features as colours (PNG): 3 principal components as RGB, one PCA for all images.

    image: an image, a folder or a list file; one PCA for all of them, so matching parts share
    colours. With
    foreground_threshold (e.g. 0.5) the background (first component below it) is masked black and
    the colours come from the foreground alone, as in the DINOv2 paper.

    Writes the PNG `out` (each image, its PCA colours, and its foreground mask); returns the
    explained variance ratios.
    """
    check_foreground_threshold(foreground_threshold)
    out = str(prepare_output(out, example="pca.png", create=False, suffix=".png"))  # "~/..." expanded
    net = load(model, device)
    paths = inputs_without_outputs(image, Path(out))
    refuse_inputs_as_outputs({"out": out}, paths)
    opened, bad = open_images(paths)
    report_skipped(bad)
    feats = patch_features(net, [model_input(net, picture, image_size, resize_policy) for _, picture in opened])
    result = pca_rgb(feats, foreground_threshold)
    panels = []
    for (path, picture), colours, fg in zip(opened, result["rgb"], result["foreground"], strict=True):
        rgb = shrink(np.asarray(picture), DRAWN_SIDE)
        panels += [
            (path.name, rgb),
            (
                "PCA (nearest)",
                to_uint8(upsample(colours.transpose(2, 0, 1), rgb.shape[:2], "nearest").transpose(1, 2, 0)),
            ),
        ]
        if foreground_threshold is not None:
            panels.append(
                (
                    f"foreground > {foreground_threshold}",
                    mask_overlay(rgb, upsample(fg.astype(np.float32), rgb.shape[:2], "nearest") > 0.5),
                )
            )
    columns = 3 if foreground_threshold is not None else 2
    save_figure(out, panel_figure(panels, columns=columns, title=f"{label(model)}: joint PCA of patch features"))
    return {
        "out": out,
        "images": len(opened),
        "skipped": [str(p) for p in bad],
        "explained_variance_ratio": [float(v) for v in result["explained_variance_ratio"]],
        "foreground_fraction": [float(f.mean()) for f in result["foreground"]],
    }


def visualize_similarity(
    image: str,
    x: int,
    y: int,
    out: str,
    target: str | None = None,
    model: str = "dinov2_vits14",
    image_size: int = 448,
    resize_policy: str = "aspect",
    device: str = "auto",
) -> dict:
    """Cosine similarity of the patch under a pixel to every patch of an image, as a PNG heat map.

    x = column, y = row of the pixel in `image`; target: the image compared (default: the same).

    Writes the PNG `out`; returns the chosen patch and the best-matching target patch.
    """
    out = str(prepare_output(out, example="similarity.png", create=False, suffix=".png"))  # "~/..." expanded
    refuse_inputs_as_outputs({"out": out}, [image] if target is None else [image, target])
    source_picture = open_rgb(image)  # each image decoded once, for the model and the picture
    source_rgb = np.asarray(source_picture)
    try:
        pixel_to_patch(x, y, source_rgb.shape[:2], (1, 1))  # a pixel outside the image: an error before the model loads
    except ValueError as e:
        raise DinokitError(str(e)) from None
    net = load(model, device)
    source = patch_features(net, [model_input(net, source_picture, image_size, resize_policy)])[0]
    patch = pixel_to_patch(x, y, source_rgb.shape[:2], source.shape[:2])
    if target is None:
        target_rgb, target_feats = source_rgb, source
    else:
        target_picture = open_rgb(target)
        target_rgb = np.asarray(target_picture)
        target_feats = patch_features(net, [model_input(net, target_picture, image_size, resize_policy)])[0]
    cos = patch_similarity(source, patch, target_feats)
    marked = shrink(source_rgb, DRAWN_SIDE).copy()  # the pixel (x, y) drawn at (cx, cy) of the shrunk copy
    cx, cy = int(x * marked.shape[1] / source_rgb.shape[1]), int(y * marked.shape[0] / source_rgb.shape[0])
    r = max(2, min(marked.shape[:2]) // 60)
    marked[max(0, cy - r) : cy + r + 1, max(0, cx - r) : cx + r + 1] = (255, 0, 0)
    target_rgb = shrink(target_rgb, DRAWN_SIDE)
    scale = f"cosine {cos.min():.3f} (dark) .. {cos.max():.3f} (bright)"  # the colours span this map's own range
    panels = [("chosen pixel", marked), (scale, heat_overlay(target_rgb, cos)), ("per patch, same colours", cos)]
    save_figure(out, panel_figure(panels, columns=3, title=f"{label(model)}: similarity of patch {patch}"))
    best = np.unravel_index(int(np.argmax(cos)), cos.shape)
    return {"out": out, "patch": list(patch), "best_match": [int(best[0]), int(best[1])], "max": float(cos.max())}


def visualize_matches(
    image: str,
    other: str,
    out: str,
    model: str = "dinov2_vits14",
    image_size: int = 448,
    resize_policy: str = "aspect",
    max_matches: int | None = 50,
    min_similarity: float | None = None,
    ratio: float | None = None,
    foreground_threshold: float | None = None,
    json: str | None = None,
    device: str = "auto",
) -> dict:
    """Patch matches between two images as a PNG: mutual nearest neighbours of their patch features.

    Top: `image` and `other` side by side, a line between the centres of each matched patch pair,
    coloured by cosine similarity. Below: each image with its best-match map (every patch's highest
    cosine to any patch of the other image: where each has a counterpart in the other).
    max_matches: the sparse mode, at most this many pairs, the strongest spread out; none: every
    mutual match (dense). min_similarity: a cosine floor. ratio: Lowe's ratio test (e.g. 0.8).
    foreground_threshold (e.g. 0.5): match foreground patches only (PCA first component, as
    `dinokit visualize pca`). json: also write the matches there: pixel (x, y) of the patch centres
    in each original image (upright in its EXIF orientation; pixel k spans [k, k + 1)), their cosine,
    and the patches' (row, col), with the settings, each image's width and height in pixels and the
    number of candidates (matches before max_matches).

    Writes the PNG `out` (and `json`); returns the number of matches, the grids and the files.
    """
    check_options(min_similarity, max_matches, ratio)
    check_foreground_threshold(foreground_threshold)
    out = str(prepare_output(out, example="matches.png", create=False, suffix=".png"))  # "~/..." expanded
    if json is not None:
        json = str(prepare_output(json, example="matches.json", create=False, suffix=".json"))
    refuse_inputs_as_outputs({"out": out, "json": json}, [image, other])
    pictures = [open_rgb(image), open_rgb(other)]  # unreadable or missing files: an error before the model loads
    net = load(model, device)
    inputs = [model_input(net, picture, image_size, resize_policy) for picture in pictures]
    feats = patch_features(net, inputs)
    foreground = None if foreground_threshold is None else pca_rgb(feats, foreground_threshold)["foreground"]
    similarity = cosine_matrix(*feats)  # once, for the matches and the best-match maps
    options = {"min_similarity": min_similarity, "ratio": ratio, "foreground": foreground, "similarity": similarity}
    matches = match_patches(*feats, max_matches=max_matches, **options)
    candidates = matches["candidates"]
    rgbs = [np.asarray(picture) for picture in pictures]
    xy = [
        np.stack(patch_to_pixel(*m.T, rgb.shape[:2], f.shape[:2]), axis=1)
        for m, rgb, f in zip((matches["a"], matches["b"]), rgbs, feats, strict=True)
    ]
    best = best_match_similarity(*feats, similarity=similarity)
    del similarity
    # drawn at most DRAWN_SIDE px (the figure is about 800 px wide): two 24 MP photos drawn whole took 4 GB
    drawn = [shrink(rgb, DRAWN_SIDE) for rgb in rgbs]
    drawn_xy = [
        p * [d.shape[1] / rgb.shape[1], d.shape[0] / rgb.shape[0]] for p, d, rgb in zip(xy, drawn, rgbs, strict=True)
    ]
    names = [Path(image).name, Path(other).name]
    overlays, scale = joint_heat_overlays(drawn, best)
    below = [
        (f"{name}: best-match cosine {m.min():.3f}..{m.max():.3f}", picture)
        for name, picture, m in zip(names, overlays, best, strict=True)
    ]
    n = len(matches["similarity"])
    shown = f"{n} of {candidates}" if n < candidates else f"{n}"
    filters = [f"foreground > {foreground_threshold}"] if foreground_threshold is not None else []
    filters += [f"cosine >= {min_similarity}"] if min_similarity is not None else []
    filters += [f"ratio test {ratio}"] if ratio is not None else []
    title = (
        f"{label(model)} at {tuple(inputs[0].shape[-2:])} and {tuple(inputs[1].shape[-2:])}: {shown} mutual "
        f"nearest-neighbour patch match{'' if shown == '1' else 'es'}" + (f" ({', '.join(filters)})" if filters else "")
    )
    below_bar = (*scale, "best-match cosine, both images")
    save_figure(out, matches_figure(tuple(drawn), tuple(drawn_xy), matches["similarity"], below, title, below_bar))
    if json is not None:
        pairs = [
            {
                "image": [round(float(v), 2) for v in p],
                "other": [round(float(v), 2) for v in q],
                "similarity": float(c),
                "patch": [int(v) for v in pa],
                "other_patch": [int(v) for v in pb],
            }
            for p, q, c, pa, pb in zip(*xy, matches["similarity"], matches["a"], matches["b"], strict=True)
        ]
        write_json(
            json,
            {
                "model": model,
                "image": str(image),
                "other": str(other),
                "settings": {
                    "image_size": image_size,
                    "resize_policy": resize_policy,
                    "max_matches": max_matches,
                    "min_similarity": min_similarity,
                    "ratio": ratio,
                    "foreground_threshold": foreground_threshold,
                },
                "image_width_height": [rgbs[0].shape[1], rgbs[0].shape[0]],
                "other_width_height": [rgbs[1].shape[1], rgbs[1].shape[0]],
                "grid": list(feats[0].shape[:2]),
                "other_grid": list(feats[1].shape[:2]),
                "candidates": candidates,
                "matches": pairs,
            },
        )
    sims = matches["similarity"]
    return {
        "out": out,
        "json": json,
        "grid": list(feats[0].shape[:2]),
        "other_grid": list(feats[1].shape[:2]),
        "matches": n,
        "candidates": candidates,
        "similarity": [float(sims.min()), float(sims.max())] if n else [],
    }


def segment(
    reference: list[str],
    reference_mask: list[str],
    target: str,
    out: str = "out/segment",
    model: str = "dinov2_vits14",
    image_size: int = 448,
    resize_policy: str = "aspect",
    threshold: float | str = "otsu",
    device: str = "auto",
    reference_class: int | None = None,
) -> dict:
    """Zero-shot segmentation: find in each target image what the reference masks mark.

    reference / reference_mask: one image and its mask (nonzero pixels = object; in a palette PNG
    such as Pascal VOC's, index 0 = background, 255 = void, ignored, any other = object), or lists of
    them (their similarity maps are averaged). reference_class: the class index that marks the object
    in the masks (the others are background, 255 void), e.g. 15 for VOC's person. target: an image,
    a folder or a list file. threshold: a cosine value, or otsu (automatic, per target). Writes
    <out>/<name>_mask.png (0/255), <out>/<name>_overlay.png and <out>/segment.json (written first,
    "complete": false until the end); <name> is the target's path relative to the target folder
    (subfolders kept, see `output_names`). Returns, per target, the threshold, mask
    fraction and the two files (also in segment.json).

    A mask is read in its EXIF orientation and must be pixel-aligned with its reference image: the
    same size, or the same aspect ratio (resized, nearest).
    """
    references = [reference] if isinstance(reference, str) else list(reference)
    masks = [reference_mask] if isinstance(reference_mask, str) else list(reference_mask)
    if len(references) != len(masks):
        raise DinokitError(f"{len(references)} reference images but {len(masks)} reference masks: give one mask each")
    check_threshold(threshold)
    out = str(prepare_output(out, folder=True, create=False))  # "~/..." expanded
    refuse_other_outputs(out, ("segment.json",), "dinokit segment")
    out_dir = Path(out)
    paths = inputs_without_outputs(target, out_dir)
    names = output_names(paths, target)
    outputs = [f"{name}{suffix}" for name in names for suffix in ("_mask.png", "_overlay.png")]
    refuse_overwriting_inputs(out_dir, [out_dir / p for p in [*outputs, "segment.json"]], [*paths, *references, *masks])
    refuse_files_no_run_wrote(out_dir, outputs, ("segment.json",), "dinokit segment")  # e.g. hand-made masks
    net = load(model, device)
    refs = []
    for ref, mask_path in zip(references, masks, strict=True):
        picture = open_rgb(ref)
        feats = patch_features(net, [model_input(net, picture, image_size, resize_policy)])[0]
        refs.append((feats, read_mask(mask_path, picture.size, reference_class)))
    report = {"complete": False, "model": model, "references": references}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "segment.json", report)  # first: a rerun after a stop knows the masks as a segment run's
    results = []
    bad = []
    first_error = None
    for path, name in zip(paths, names, strict=True):
        try:
            picture = open_rgb(path)
        except UnreadableImage as err:
            bad.append(path)
            first_error = first_error or err
            continue
        rgb = np.asarray(picture)
        feats = patch_features(net, [model_input(net, picture, image_size, resize_policy)])[0]
        seg = segment_features(refs, feats, rgb.shape[:2], threshold)
        results.append(
            {
                "target": str(path),
                "threshold": seg["threshold"],
                "foreground": float(seg["mask"].mean()),
                "mask": save_png(out_dir / f"{name}_mask.png", seg["mask"].astype(np.uint8) * 255),
                "overlay": save_png(out_dir / f"{name}_overlay.png", mask_overlay(rgb, seg["mask"])),
            }
        )
    if not results:
        raise DinokitError(f"none of the {len(bad)} target images can be read; the first: {first_error}")
    report_skipped(bad)
    skipped = [str(p) for p in bad]
    write_json(out_dir / "segment.json", report | {"complete": True, "results": results, "skipped": skipped})
    return {"out": str(out_dir), "results": results, "skipped": skipped}


def check_foreground_threshold(foreground_threshold: float | None) -> None:
    if foreground_threshold is not None and not 0 <= foreground_threshold <= 1:
        raise DinokitError(
            f"foreground_threshold must be between 0 and 1 (the first component is scaled to [0, 1]), "
            f"got {foreground_threshold}"
        )


def inputs_without_outputs(source: str, out: Path) -> list[Path]:
    """The images of `source` (`list_images`); for a folder, less `out` and the files under it: a run
    with out= inside its input folder must not take its own earlier pictures as inputs."""
    paths = list_images(source)
    if not Path(source).expanduser().is_dir():
        return paths  # images named one by one are taken as named
    out = out.resolve()
    kept = [p for p in paths if p.resolve() != out and out not in p.resolve().parents]
    if not kept:
        raise DinokitError(f"{source} holds no images besides the outputs in {out}")
    return kept


def report_skipped(bad: list[Path]) -> None:
    if bad:
        names = ", ".join(str(p) for p in bad[:5]) + (" ..." if len(bad) > 5 else "")
        print(f"skipped {len(bad)} unreadable image(s): {names}")


VOID = 255  # the class index of a palette mask's unlabelled pixels (Pascal VOC's object borders)


def read_mask(path: str | Path, size: tuple[int, int], reference_class: int | None = None) -> np.ndarray:
    """A mask (H, W) float32 from an image file: 1 = object, 0 = background, NaN = void (neither), in
    its EXIF orientation, for an image of `size` (W, H): the same size, or the same aspect ratio (to
    1 px) resized (nearest) to it.

    The object: the pixels of index `reference_class` (a class-index mask: palette or grayscale), or
    without it the nonzero pixels. Index 255 of a palette (P) PNG, and of any mask read with a
    reference_class other than 255, is void, as in Pascal VOC's masks (0 background, 1..20 classes,
    255 borders). Transparent pixels are background, whatever colour they hide."""
    im = open_image(path, what="reference mask")
    if reference_class is not None and im.mode not in CLASS_INDEX_MODES:
        raise DinokitError(
            f"reference_class={reference_class} picks pixels by class index, but the reference mask {path} is a "
            f"{im.mode} image (colours): pass a class-index PNG (palette or grayscale), or leave reference_class "
            "out (nonzero pixels = object)"
        )
    values = np.asarray(im if im.mode in CLASS_INDEX_MODES else im.convert("L")).astype(np.int64)
    if reference_class is None:
        codes = np.where(values != 0, 1, 0)
        void = values == VOID if im.mode == "P" else np.zeros(values.shape, dtype=bool)
    else:
        codes = np.where(values == reference_class, 1, 0)
        void = (values == VOID) & (reference_class != VOID)
    codes[void] = 2
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # an alpha channel, or a palette's transparent entry (a palette PNG keeps no alpha channel)
        visible = np.asarray(im.convert("RGBA").getchannel("A")) > 0
        codes[~visible] = 0
    check_marks_object(values, codes, path, reference_class)
    mask = Image.fromarray(codes.astype(np.uint8))
    size = tuple(size)
    if mask.size != size and not same_aspect(mask.size, size):
        raise DinokitError(
            f"the reference mask {path} is {mask.size[0]}x{mask.size[1]} pixels (width x height) but its "
            f"image is {size[0]}x{size[1]} (both in their EXIF orientation): a mask must be pixel-aligned "
            "with its photo. Save the mask at the photo's size and orientation (or a scaled copy of it)."
        )
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return np.asarray(mask).choose([0.0, 1.0, np.nan]).astype(np.float32)


def check_marks_object(values: np.ndarray, codes: np.ndarray, path, reference_class: int | None) -> None:
    """A clear error where a mask's codes (0 background, 1 object, 2 void) mark no object pixel,
    naming the class indices it holds (its `values`)."""
    if (codes == 1).any():
        return
    found = ", ".join(str(v) for v in np.unique(values)[:20])
    if reference_class is not None:
        raise DinokitError(
            f"the reference mask {path} has no pixel of class {reference_class} (it holds {found}): pass one of its "
            "object classes as reference_class="
        )
    if (codes == 2).any():
        raise DinokitError(
            f"the reference mask {path} marks no object: it holds {found}, and in a palette mask 0 is background "
            f"and {VOID} void (ignored, as Pascal VOC's borders); if {VOID} marks the object, pass "
            f"reference_class={VOID}"
        )
    raise DinokitError(f"the reference mask {path} is empty: it must mark the object (nonzero pixels)")


def to_uint8(values: np.ndarray) -> np.ndarray:
    return (np.clip(values, 0, 1) * 255).round().astype(np.uint8)
