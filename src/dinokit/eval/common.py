"""What every evaluation command shares: the backbone, the transform, cached features of a labelled
set, and the protocol record printed and saved with each result."""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import dinokit
from dinokit import distributed as dist
from dinokit.data.labelled import read_labelled
from dinokit.errors import DinokitError
from dinokit.eval.backbone import is_random_source, load_backbone, weights_hash
from dinokit.eval.cache import Features, cached_features, default_cache_dir, ran_precision
from dinokit.models import VisionTransformer
from dinokit.runtime import resolve_device


@dataclass
class Backbone:
    model: VisionTransformer
    source: str
    description: str
    hash: str
    random: bool


def prepare_backbone(model: str, device: str = "auto", seed: int = 0) -> Backbone:
    dev = resolve_device(device)
    net, description = load_backbone(model, dev, seed)
    random = is_random_source(model)
    if random and dist.launched_as_process_0():  # once under torchrun (finetune), not once per process
        print(f"note: model={model} is a randomly initialised network; its scores are a baseline only")
    return Backbone(net, str(model), description, weights_hash(net), random)


def resolve_cache(cache: str | None) -> Path | None:
    """cache='auto' -> the default folder ($DINOKIT_CACHE/features), 'none' -> no cache, else a folder."""
    if cache is None or str(cache).lower() in ("none", "off", "false", ""):
        return None
    return default_cache_dir() if str(cache) == "auto" else Path(cache)


@dataclass
class LabelledFeatures:
    features: Features
    labels: np.ndarray  # (N,) int64, one per readable image
    class_names: list[str]
    source: str
    bad: int


@dataclass
class LabelledSplit:
    """A labelled folder / CSV as read (before any feature is computed)."""

    source: str
    paths: list[Path]
    labels: list[int]
    class_names: list[str]


def read_splits(train: str, val: str, selection: str | None = None) -> list[LabelledSplit | None]:
    """[train, val, selection (None stays None)] as read, val and selection with train's classes.
    All are read before any feature is extracted, so a missing or mistyped split fails at once rather
    than after train's features. val, the reported split, must share no image with train or selection
    (a head chosen on val, or a query found in the k-NN bank as its own neighbour, is no result)."""
    first = LabelledSplit(str(train), *read_labelled(train))
    if len(first.class_names) < 2:  # every query would be right: no measure of the features
        raise DinokitError(
            f"{train} holds one class ({first.class_names[0]}); a classifier chooses among two or more: give "
            "train a <class>/<images> folder (or CSV label) per class"
        )
    val_split, selection_split = (
        None if source is None else LabelledSplit(str(source), *read_labelled(source, first.class_names, train))
        for source in (val, selection)
    )
    reported = {os.path.abspath(p) for p in val_split.paths}
    for key, split in (("train", first), ("selection", selection_split)):
        shared = [p for p in split.paths if os.path.abspath(p) in reported] if split is not None else []
        if shared:
            raise DinokitError(
                f"val={val} and {key}={split.source} share {len(shared)} images (e.g. {shared[0]}): the reported "
                f"split must be apart from the images the probe {'learns' if key == 'train' else 'is chosen'} "
                f"on, or its score measures memory. Give val images that are not in {key}"
            )
    return [first, val_split, selection_split]


def labelled_features(
    backbone: Backbone,
    split: LabelledSplit,
    transform,
    which: tuple[str, ...],
    layers: tuple[int, ...] = (),
    cache: Path | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    precision: str = "bf16",
) -> LabelledFeatures:
    """Features of a labelled split (bad files skipped and counted), with their labels."""
    feats = split_features(
        backbone, split.source, split.paths, transform, which, layers, True, cache, batch_size, num_workers, precision
    )
    labels = np.asarray(split.labels)[feats.kept]
    return LabelledFeatures(feats, labels, split.class_names, split.source, len(feats.bad))


def split_features(
    backbone: Backbone,
    source: str,
    paths: list[Path],
    transform,
    which: tuple[str, ...],
    layers: tuple[int, ...],
    norm: bool,
    cache: Path | None,
    batch_size: int,
    num_workers: int,
    precision: str,
) -> Features:
    """Cached features of one split's images; reports skipped files and how many were reused or extracted."""
    feats = cached_features(
        backbone.model,
        paths,
        transform,
        which,
        layers,
        norm,
        cache_dir=cache,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        model_hash=backbone.hash,
    )
    if len(feats) == 0:
        raise DinokitError(f"none of the {len(paths)} images of {source} could be read")
    if feats.bad:
        print(f"{source}: skipped {len(feats.bad)} unreadable file(s), e.g. {paths[feats.bad[0]]}")
    where = f"cached at {feats.location}" if feats.location else "not cached"
    reused, extracted = len(paths) - feats.extracted, feats.extracted
    done = "reused" if not extracted else "extracted" if not reused else f"reused {reused}, extracted {extracted}"
    print(f"{source}: {len(feats)} images, features {done} ({where})")
    return feats


def make_transform(image_size: int, resize_policy: str = "center_crop", reduced_decode: bool = True):
    if resize_policy not in ("center_crop", "resize"):
        raise DinokitError(f"resize_policy must be center_crop or resize, got {resize_policy!r}")
    from dinokit.data.transforms import eval_transform  # torchvision: not for `--help`

    return eval_transform(image_size, resize_policy, reduced_decode=reduced_decode)


def protocol_record(backbone: Backbone, transform, image_size: int | None, precision: str, **extra) -> dict:
    """The facts that make a number reproducible (printed and stored with every result). transform: a
    torchvision transform, or its description where the images are not prepared by one."""
    from dinokit.data.transforms import describe  # torchvision: not for `--help`

    return {
        "model": backbone.source,
        "model_description": backbone.description,
        "weights_hash": backbone.hash,
        "random_init": backbone.random,
        "image_size": image_size,
        "transform": transform if isinstance(transform, str) else describe(transform),
        "precision": ran_precision(backbone.model, precision),  # fp32 where bf16 falls back
        **extra,
        "dinokit_version": dinokit.__version__,
    }
