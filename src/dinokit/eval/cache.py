"""Features once, probes many: an on-disk cache of extracted features, shared by every probe.

An entry's key covers everything that changes the features: the model's weights hash, the image files
(path, size and modification time of each), the transform's full description (resolution included),
the feature kinds and blocks, the LayerNorm choice and the precision. Any change gives a new key, so
a stale entry is never read. Layout:

    <cache>/<key>/meta.json                   the key's fields and the file list
    <cache>/<key>/shard-00000/<kind>.npy      features of images [0, shard_size), in order
    <cache>/<key>/shard-00000/rows.json       which of those images were read, which were bad

A shard is written into a temporary folder and renamed into place when complete: an interrupted
extraction resumes at the first missing shard, and no reader sees a partial one. Arrays are opened
memory-mapped, so a k-NN bank of millions of rows is read chunk by chunk. Patch-token kinds are stored
as float16 (half the disk; dense probes upcast per batch), the rest as float32.
"""

import errno
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dinokit.eval.backbone import weights_hash
from dinokit.features.extract import extract_features, iter_features
from dinokit.io import atomic_folder, path_bytes, read_json, write_json
from dinokit.runtime import effective_precision

CACHE_FORMAT = 1
HALF_PRECISION_KINDS = ("patch_tokens", "layer_patch_tokens")
DAMAGED_CACHE = "remove the cache entry {} (its features are then extracted again)"


def default_cache_dir() -> Path:
    from dinokit.models.hub import cache_dir

    return cache_dir() / "features"


def storage_dtype(kind: str) -> np.dtype:
    return np.dtype(np.float16 if kind in HALF_PRECISION_KINDS else np.float32)


@dataclass
class Features:
    """Features of the readable images of a path list, in order.

    shards: {kind: [array per shard]} (memory-mapped when cached); kept: index into the path list of
    each row; bad: indices of unreadable files (skipped and counted, never fatal).
    """

    shards: dict[str, list[np.ndarray]]
    kept: np.ndarray
    bad: list[int]
    key: str = ""
    location: Path | None = None
    reused: bool = False
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.kept)

    def array(self, kind: str) -> np.ndarray:
        """All rows of `kind` in memory, (N, ...)."""
        parts = self.shards[kind]
        return np.concatenate(parts) if len(parts) != 1 else np.array(parts[0])

    def rows(self, kind: str, index: np.ndarray) -> np.ndarray:
        """Rows `index` (global row numbers) of `kind`, read shard by shard."""
        parts = self.shards[kind]
        ends = np.cumsum([len(p) for p in parts])
        index = np.asarray(index)
        out = np.empty((len(index), *parts[0].shape[1:]), dtype=parts[0].dtype)
        shard_of = np.searchsorted(ends, index, side="right")
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            local = index[sel] - (ends[s] - len(parts[s]))
            order = np.argsort(local)
            out[sel[order]] = parts[s][local[order]]
        return out


def files_fingerprint(paths: Sequence[Path]) -> str:
    """Hash of the path list with each file's size and modification time (absent files included)."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = Path(p).stat()
            h.update(path_bytes(f"{Path(p).resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n"))
        except OSError:
            h.update(path_bytes(f"{p}\tmissing\n"))
    return h.hexdigest()


def ran_precision(model: torch.nn.Module, precision: str) -> str:
    """The precision that features of `model` are computed in when `precision` is asked for (bf16 falls
    back to fp32 on devices without it: `runtime.effective_precision`)."""
    device = next(model.parameters(), torch.empty(0)).device
    return effective_precision(device, precision)


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _write_shard(folder: Path, model, paths: Sequence[Path], first: int, transform, extract_kw: dict, bar) -> None:
    """Extract images [first, first + len(paths)) into `folder`, streaming into memory-mapped .npy files;
    `bar` (tqdm) counts the images done."""
    arrays: dict[str, np.ndarray] = {}
    kept: list[int] = []
    bad: list[int] = []
    row = 0
    for good, feats, bad_batch in iter_features(model, paths, transform, **extract_kw):
        bar.update(len(good) + len(bad_batch))
        bad += [first + i for i in bad_batch]
        if not feats:
            continue
        for kind, value in feats.items():
            if kind not in arrays:
                arrays[kind] = np.lib.format.open_memmap(
                    folder / f"{kind}.npy", mode="w+", dtype=storage_dtype(kind), shape=(len(paths), *value.shape[1:])
                )
                reserve_space(folder / f"{kind}.npy")
            arrays[kind][row : row + len(value)] = value.numpy()
        kept += (good + first).tolist()
        row += len(good)
    for a in arrays.values():
        a.flush()
    write_json(folder / "rows.json", {"kept": kept, "bad": bad})


def reserve_space(path: Path) -> None:
    """Allocate the disk blocks of the (sparse) file `path`: a memory-mapped write to a full disk kills
    the process with SIGBUS and no message; this raises OSError (ENOSPC) naming the file instead. A
    no-op where the platform or file system cannot allocate ahead."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise OSError(e.errno, e.strerror, str(path)) from None


def _read_shard(folder: Path, kinds: Sequence[str]) -> tuple[dict[str, np.ndarray], list[int], list[int]]:
    rows = read_json(folder / "rows.json", DAMAGED_CACHE.format(folder.parent))
    n = len(rows["kept"])
    arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r")[:n] for k in kinds if n}
    return arrays, rows["kept"], rows["bad"]


def cached_features(
    model: torch.nn.Module,
    paths: Sequence[Path],
    transform,
    which: Sequence[str] = ("cls",),
    layers: Sequence[int] = (),
    norm: bool = True,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    precision: str = "bf16",
    shard_size: int = 16384,
    progress: bool = True,
    model_hash: str | None = None,
) -> Features:
    """Features of `paths` (readable ones, in order) from the cache, extracting what is missing.

    cache_dir=None: extract in memory, write nothing. The features are the same either way (same
    extractor, same storage dtypes).
    """
    paths = list(paths)
    which = sorted(which)
    extract_kw = dict(
        which=which,
        layers=list(layers),
        norm=norm,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        progress=progress,
    )
    from dinokit.data.transforms import describe  # torchvision: not for `--help`

    fields = {
        "format": CACHE_FORMAT,
        "model": model_hash or weights_hash(model),
        "files": files_fingerprint(paths),
        "count": len(paths),
        "transform": describe(transform),
        "kinds": which,
        "layers": list(layers),
        "norm": norm,
        "precision": ran_precision(model, precision),  # bf16 asked where it falls back: fp32 features
    }
    key = cache_key(fields)
    if cache_dir is None:
        feats, kept, bad = extract_features(model, paths, transform, **extract_kw)
        shards = {k: [v.numpy().astype(storage_dtype(k))] for k, v in feats.items()}
        if not kept:
            shards = {k: [np.zeros((0,), dtype=storage_dtype(k))] for k in which}
        return Features(shards, np.asarray(kept, dtype=np.int64), bad, key, None, False, fields)

    entry = Path(cache_dir).expanduser() / key
    entry.mkdir(parents=True, exist_ok=True)
    if not (entry / "meta.json").exists():
        write_json(entry / "meta.json", {**fields, "shard_size": shard_size, "paths": [str(p) for p in paths]})
    shard_size = read_json(entry / "meta.json", DAMAGED_CACHE.format(entry))["shard_size"]
    reused = True
    shards: dict[str, list[np.ndarray]] = {k: [] for k in which}
    kept: list[int] = []
    bad: list[int] = []
    starts = range(0, len(paths), shard_size)
    missing = [
        first for number, first in enumerate(starts) if not (entry / f"shard-{number:05d}" / "rows.json").exists()
    ]
    # one bar over the images still to extract (not one per shard, each reaching 100%)
    bar = tqdm(
        total=sum(min(shard_size, len(paths) - first) for first in missing),
        desc="features",
        unit="img",
        disable=not progress or not missing,
        leave=False,
    )
    extract_kw["progress"] = False
    for number, first in enumerate(starts):
        folder = entry / f"shard-{number:05d}"
        if not (folder / "rows.json").exists():
            reused = False
            with atomic_folder(folder) as tmp:
                _write_shard(tmp, model, paths[first : first + shard_size], first, transform, extract_kw, bar)
        arrays, shard_kept, shard_bad = _read_shard(folder, which)
        for k, a in arrays.items():
            shards[k].append(a)
        kept += shard_kept
        bad += shard_bad
    bar.close()
    return Features(shards, np.asarray(kept, dtype=np.int64), bad, key, entry, reused, fields)
