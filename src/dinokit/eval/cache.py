"""Features once, probes many: an on-disk cache of extracted features, shared by every probe.

An entry's key covers everything that changes the features: the model's weights hash, the image files
(path, size and modification time of each), the transform's full description (resolution included),
the feature kinds and blocks, the LayerNorm choice and the precision. Any change gives a new key, so
a stale entry is never read. Layout:

    <cache>/<key>/meta.json                   the key's fields, the files (resolved paths) and their
                                              [size, mtime ns] stamps
    <cache>/<key>/shard-00000/<kind>.npy      features of images [0, shard_size), in order
    <cache>/<key>/shard-00000/rows.json       which of those images were read, which were bad

A shard is written into a temporary folder and renamed into place when complete: an interrupted
extraction resumes at the first missing shard, and no reader sees a partial one. Arrays are opened
memory-mapped, so a k-NN bank of millions of rows is read chunk by chunk. Patch-token kinds are stored
as float16 (half the disk; dense probes upcast per batch), the rest as float32.

A new entry (an image added to a split, replaced or removed) takes what it can from a donor: the entry
of the same model, transform, kinds, layers, norm and precision whose finished shards hold the most of
its files with their stamps unchanged. Those files' rows are copied from the donor's shards (an
unreadable one stays bad), the rest extracted. The rows are a fresh extraction's, except that patch
tokens may differ in their last bits (float16 rounding), as the extractor's do with the batch an image
is in. The donor stays as it was.
"""

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dinokit.eval.backbone import weights_hash
from dinokit.features.extract import extract_features, iter_features
from dinokit.io import atomic_folder, file_stamps, path_bytes, read_json, write_json
from dinokit.runtime import effective_precision

CACHE_FORMAT = 1
HALF_PRECISION_KINDS = ("patch_tokens", "layer_patch_tokens")
DAMAGED_CACHE = "remove the cache entry {} (its features are then extracted again)"
FILE_FIELDS = ("files", "count")  # the key's fields of the file list; a donor matches on all the others
GATHER_ROWS = 1024  # rows copied from a donor shard at a time


def default_cache_dir() -> Path:
    from dinokit.models.hub import cache_dir

    return cache_dir() / "features"


def storage_dtype(kind: str) -> np.dtype:
    return np.dtype(np.float16 if kind in HALF_PRECISION_KINDS else np.float32)


@dataclass
class Features:
    """Features of the readable images of a path list, in order.

    shards: {kind: [array per shard]} (memory-mapped when cached); kept: index into the path list of
    each row; bad: indices of unreadable files (skipped and counted, never fatal); reused: nothing was
    extracted (every file's row or bad mark came from the cache); extracted: how many files were read.
    """

    shards: dict[str, list[np.ndarray]]
    kept: np.ndarray
    bad: list[int]
    key: str = ""
    location: Path | None = None
    reused: bool = False
    info: dict = field(default_factory=dict)
    extracted: int = 0

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


def files_fingerprint(paths: Sequence[Path], files: Sequence[str], stamps: Sequence[Sequence[int]]) -> str:
    """Hash of the path list: each file's resolved path (`files`), size and modification time (`stamps`:
    file_stamps of `paths`; an absent file, [-1, -1], by its path as given)."""
    h = hashlib.sha256()
    for p, f, (size, mtime) in zip(paths, files, stamps, strict=True):
        h.update(path_bytes(f"{p}\tmissing\n" if size < 0 else f"{f}\t{size}\t{mtime}\n"))
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


class Donor:
    """An entry of the same model, transform, kinds, layers, norm and precision as a new one: `index`
    (N,) gives, for each file of the new list, its index in the donor's list where the donor read it
    with the same stamp (in a finished shard), else -1. Its shards are opened (memory-mapped) as needed."""

    def __init__(self, entry: Path, shard_size: int, index: np.ndarray, kinds: Sequence[str]):
        self.entry, self.shard_size, self.index, self.kinds = entry, shard_size, index, kinds
        self.opened: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}

    def shard(self, number: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """({kind: rows} memory-mapped, the donor's indices of those rows, ascending) of shard `number`."""
        if number not in self.opened:
            arrays, kept, _ = _read_shard(self.entry / f"shard-{number:05d}", self.kinds)
            self.opened[number] = arrays, np.asarray(kept, dtype=np.int64)
        return self.opened[number]

    def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, row in it) of the donor's files `index` (n,); row -1 where the file was bad."""
        number = index // self.shard_size
        row = np.full(len(index), -1, dtype=np.int64)
        for s in np.unique(number):
            sel = np.nonzero(number == s)[0]
            kept = self.shard(int(s))[1]
            at = np.searchsorted(kept, index[sel]).clip(max=max(len(kept) - 1, 0))
            found = (kept[at] == index[sel]) if len(kept) else np.zeros(len(sel), dtype=bool)
            row[sel] = np.where(found, at, -1)
        return number, row


def find_donor(
    cache: Path, key: str, fields: dict, files: Sequence[str], stamps: Sequence[Sequence[int]]
) -> Donor | None:
    """The entry under `cache` (not `key`) with the same fields but the files' that holds the most of
    `files` with the same `stamps` in its finished shards; None where no entry holds any. Reads the
    entries' meta.json and lists their shards; entries written before stamps were recorded, or damaged,
    give nothing."""
    same = {k: v for k, v in fields.items() if k not in FILE_FIELDS}
    best, most = None, 0
    for meta_path in sorted(cache.glob("*/meta.json")):
        if meta_path.parent.name == key:
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if "stamps" not in meta or any(meta.get(k) != v for k, v in same.items()):
            continue
        done = {int(p.parent.name.removeprefix("shard-")) for p in meta_path.parent.glob("shard-*/rows.json")}
        held = {
            (f, tuple(stamp)): i
            for i, (f, stamp) in enumerate(zip(meta["paths"], meta["stamps"], strict=True))
            if i // meta["shard_size"] in done
        }
        wanted = zip(files, stamps, strict=True)
        index = np.array([held.get((f, tuple(stamp)), -1) for f, stamp in wanted], dtype=np.int64)
        if (index >= 0).sum() > most:
            best, most = Donor(meta_path.parent, meta["shard_size"], index, same["kinds"]), (index >= 0).sum()
    return best


def copy_rows(out: np.ndarray, at: np.ndarray, source: np.ndarray, rows: np.ndarray) -> None:
    """out[at] = source[rows], GATHER_ROWS rows at a time (`source` memory-mapped: never read whole)."""
    for c in range(0, len(rows), GATHER_ROWS):
        out[at[c : c + GATHER_ROWS]] = source[rows[c : c + GATHER_ROWS]]


def _assemble_shard(
    folder: Path, model, paths: Sequence[Path], first: int, donor: Donor, transform, extract_kw: dict, bar
) -> int:
    """Images [first, first + len(paths)) into `folder` as _write_shard writes them: the rows of files
    the donor holds unchanged copied from its shards (GATHER_ROWS at a time), the rest extracted (into
    `folder`/fresh first, removed after). Returns how many files were extracted."""
    n = len(paths)
    source = donor.index[first : first + n]
    taken = np.nonzero(source >= 0)[0]
    number, row = donor.rows(source[taken])
    fresh = np.nonzero(source < 0)[0]
    fresh_arrays: dict[str, np.ndarray] = {}
    fresh_kept, fresh_bad = np.zeros(0, dtype=np.int64), []
    if len(fresh):
        (folder / "fresh").mkdir()
        _write_shard(folder / "fresh", model, [paths[j] for j in fresh], 0, transform, extract_kw, bar)
        fresh_arrays, kept, bad = _read_shard(folder / "fresh", donor.kinds)
        fresh_kept, fresh_bad = fresh[np.asarray(kept, dtype=np.int64)], [int(fresh[i]) for i in bad]
    good = np.sort(np.concatenate([taken[row >= 0], fresh_kept]))  # local indices of the rows, in order
    if len(good):
        for kind in donor.kinds:
            like = fresh_arrays[kind] if fresh_arrays else donor.shard(int(number[row >= 0][0]))[0][kind]
            out = np.lib.format.open_memmap(
                folder / f"{kind}.npy", mode="w+", dtype=like.dtype, shape=(n, *like.shape[1:])
            )
            reserve_space(folder / f"{kind}.npy")
            for s in np.unique(number[row >= 0]):
                sel = np.nonzero((number == s) & (row >= 0))[0]
                copy_rows(out, np.searchsorted(good, taken[sel]), donor.shard(int(s))[0][kind], row[sel])
            if len(fresh_kept):
                copy_rows(out, np.searchsorted(good, fresh_kept), fresh_arrays[kind], np.arange(len(fresh_kept)))
            out.flush()
            del out
    fresh_arrays.clear()
    shutil.rmtree(folder / "fresh", ignore_errors=True)
    bad = sorted(taken[row < 0].tolist() + fresh_bad)
    write_json(folder / "rows.json", {"kept": (good + first).tolist(), "bad": [first + j for j in bad]})
    return len(fresh)


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
    extractor, same storage dtypes). A new entry takes the rows of files unchanged since a donor entry
    read them (find_donor) and extracts the rest.
    """
    paths = list(paths)
    stamps = file_stamps(paths)  # before the files are read: a later change shows in the next key
    files = [str(Path(p).resolve()) for p in paths]
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
        "files": files_fingerprint(paths, files, stamps),
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
        return Features(shards, np.asarray(kept, dtype=np.int64), bad, key, None, False, fields, len(paths))

    entry = Path(cache_dir).expanduser() / key
    entry.mkdir(parents=True, exist_ok=True)
    if not (entry / "meta.json").exists():
        write_json(entry / "meta.json", {**fields, "shard_size": shard_size, "paths": files, "stamps": stamps})
    shard_size = read_json(entry / "meta.json", DAMAGED_CACHE.format(entry))["shard_size"]
    extracted = 0
    shards: dict[str, list[np.ndarray]] = {k: [] for k in which}
    kept: list[int] = []
    bad: list[int] = []
    starts = range(0, len(paths), shard_size)
    missing = [
        first for number, first in enumerate(starts) if not (entry / f"shard-{number:05d}" / "rows.json").exists()
    ]
    donor = find_donor(entry.parent, key, fields, files, stamps) if missing else None
    taken = 0 if donor is None else sum(int((donor.index[f : f + shard_size] >= 0).sum()) for f in missing)
    # one bar over the images still to extract (not one per shard, each reaching 100%)
    bar = tqdm(
        total=sum(min(shard_size, len(paths) - first) for first in missing) - taken,
        desc="features",
        unit="img",
        disable=not progress or not missing,
        leave=False,
    )
    extract_kw["progress"] = False
    for number, first in enumerate(starts):
        folder = entry / f"shard-{number:05d}"
        if not (folder / "rows.json").exists():
            part = paths[first : first + shard_size]
            with atomic_folder(folder) as tmp:
                if donor is not None and (donor.index[first : first + shard_size] >= 0).any():
                    extracted += _assemble_shard(tmp, model, part, first, donor, transform, extract_kw, bar)
                else:
                    _write_shard(tmp, model, part, first, transform, extract_kw, bar)
                    extracted += len(part)
        arrays, shard_kept, shard_bad = _read_shard(folder, which)
        for k, a in arrays.items():
            shards[k].append(a)
        kept += shard_kept
        bad += shard_bad
    bar.close()
    return Features(shards, np.asarray(kept, dtype=np.int64), bad, key, entry, extracted == 0, fields, extracted)
