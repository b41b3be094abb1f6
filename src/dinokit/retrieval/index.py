"""A faiss index over embedded images, persisted with its file list and the settings that made it.

Vectors are L2-normalised, so inner product = cosine similarity, and scores are cosines (exact
for `flat`, and for `ivf` when nprobe = nlist). Index kinds (faiss factory strings):
  flat    exact search, O(N) per query: the default, fine up to a few million vectors
  ivf     IVF{nlist},Flat: k-means cells, search `nprobe` of them (default ceil(sqrt(nlist)))
  hnsw    HNSW{hnsw_m}: graph search, no training, more memory
  pq      PQ{pq_m}x{pq_bits}: product-quantised codes (pq_m * pq_bits / 8 bytes per vector)
  ivfpq   IVF{nlist},PQ{pq_m}x{pq_bits}: both, for hundreds of millions of vectors

An index folder holds index.json (settings, the embedding run's model, weights hash and transform,
and which generation of the files below is current), index-<g>.faiss, paths-<g>.txt (one image
per line, in id order) and stamps-<g>.npy ((N, 2) int64: each image's size and mtime in ns when it was
embedded, -1 where unknown). Adding writes generation g + 1 and switches index.json last (atomically), so an
interrupted add leaves the previous index intact.
"""

import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from dinokit.errors import DinokitError, require
from dinokit.io import atomic_write, read_json, read_text, write_json, write_text

INDEX_KINDS = ("flat", "ivf", "hnsw", "pq", "ivfpq")
INDEX_META = "index.json"
# faiss's k-means trains on at most this many vectors per centroid (ClusteringParameters.max_points_per_centroid)
TRAINING_POINTS_PER_CENTROID = 256


def factory_string(
    kind: str, dim: int, count: int, nlist: int | None = None, pq_m: int = 16, pq_bits: int = 8, hnsw_m: int = 32
) -> str:
    """The faiss index_factory string of an index kind (see the module docstring)."""
    if kind not in INDEX_KINDS:
        raise DinokitError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    checks = [
        (nlist is None or nlist >= 1, f"nlist must be >= 1 (or left out: 4 sqrt(N), at most N / 39), got {nlist}"),
        (kind != "hnsw" or hnsw_m >= 2, f"hnsw_m must be >= 2 (links per graph node, e.g. 32), got {hnsw_m}"),
        (kind not in ("pq", "ivfpq") or pq_m >= 1, f"pq_m must be >= 1 (sub-vectors per code), got {pq_m}"),
        (kind not in ("pq", "ivfpq") or 1 <= pq_bits <= 16, f"pq_bits must be 1 to 16 (e.g. 8), got {pq_bits}"),
    ]
    require(checks)  # faiss aborts the process, or fails to parse, on these
    nlist = nlist or max(1, min(int(4 * math.sqrt(count)), count // 39))  # faiss wants >= 39 points per cell
    if kind in ("pq", "ivfpq") and dim % pq_m:
        raise DinokitError(f"pq_m={pq_m} must divide the feature dimension {dim}")
    return {
        "flat": "Flat",
        "ivf": f"IVF{nlist},Flat",
        "hnsw": f"HNSW{hnsw_m}",
        "pq": f"PQ{pq_m}x{pq_bits}",
        "ivfpq": f"IVF{nlist},PQ{pq_m}x{pq_bits}",
    }[kind]


def built_options(meta: dict) -> dict:
    """The kind and options (nlist, pq_m, pq_bits, hnsw_m) an index was built with, as its factory
    string states them."""
    factory, options = meta["factory"], {"kind": meta["kind"]}
    if ivf := re.search(r"IVF(\d+)", factory):
        options["nlist"] = int(ivf.group(1))
    if pq := re.search(r"PQ(\d+)x(\d+)", factory):
        options["pq_m"], options["pq_bits"] = int(pq.group(1)), int(pq.group(2))
    if hnsw := re.search(r"HNSW(\d+)", factory):
        options["hnsw_m"] = int(hnsw.group(1))
    return options


def normalise(vectors, in_place: bool = False) -> np.ndarray:
    """Rows scaled to unit L2 norm, as a contiguous float32 array (what faiss takes): a new array, or with
    in_place `vectors` itself when it is a contiguous float32 array already (no copy of N x D floats)."""
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if not in_place:
        x = x.copy()
    faiss.normalize_L2(x)
    return x


@dataclass
class FeatureIndex:
    """faiss index + the image path of every id + metadata (kind, feature, embedding settings)."""

    index: faiss.Index
    paths: list[str]
    meta: dict = field(default_factory=dict)
    stamps: np.ndarray | None = None  # (N, 2) int64: [size, mtime ns] of each image when embedded, -1: unknown

    def __post_init__(self) -> None:
        if self.stamps is None:
            self.stamps = unknown_stamps(len(self.paths))

    @classmethod
    def create(cls, vectors, paths: list[str], meta: dict, kind: str = "flat", **options) -> "FeatureIndex":
        """Build (and train, for ivf / pq kinds) an index over `vectors` (N, D); a path listed again
        is left out (its first vector is indexed)."""
        return cls.create_from_blocks(paths, lambda: iter([np.asarray(vectors)]), meta, kind, **options)

    @classmethod
    def create_from_blocks(
        cls,
        paths: list[str],
        blocks: Callable[[], Iterator[np.ndarray]],
        meta: dict,
        kind: str = "flat",
        stamps: np.ndarray | None = None,
        **options,
    ) -> "FeatureIndex":
        """`create` over vectors read a block at a time: blocks() iterates over consecutive row blocks
        (n_i, D) of the vectors of `paths` (e.g. the shards of an embedding). It is called once to add
        them (flat, hnsw), or once to train on `training_rows` and once to add (ivf, pq, ivfpq), so that
        memory holds the index, one block and the training rows, never all N x D floats. `stamps` (N, 2):
        the images' [size, mtime ns] when embedded (None: unknown)."""
        first = np.zeros(len(paths), dtype=bool)
        first[first_occurrences(same_file_keys(paths))] = True
        count = int(first.sum())
        index, train, spec, sample, seen = None, None, "", [], 0
        for block in _kept_blocks(blocks(), first):
            if index is None:
                spec = factory_string(kind, block.shape[1], count, **options)
                index = faiss.index_factory(block.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
                needed = needed_training_points(spec) if not index.is_trained else 0
                if count < needed:
                    raise DinokitError(
                        f"index {spec} needs at least {needed} vectors to train, got {count}; use kind=flat or "
                        "hnsw for small collections, or a smaller nlist / pq_bits"
                    )
                train = training_rows(spec, count) if not index.is_trained else None
            if train is None:
                index.add(block)
            else:  # the training rows of this block
                sample.append(block[train[(train >= seen) & (train < seen + len(block))] - seen])
            seen += len(block)
        if index is None:
            raise DinokitError("there are no vectors to index: embed some images first")
        if train is not None:
            index.train(np.concatenate(sample))
            del sample
            for block in _kept_blocks(blocks(), first):
                index.add(block)
        kept = np.flatnonzero(first).tolist()
        dim = int(index.d)
        stamps = unknown_stamps(len(paths)) if stamps is None else np.asarray(stamps, dtype=np.int64)
        meta = {**meta, "kind": kind, "factory": spec, "dim": dim}
        return cls(index, [paths[i] for i in kept], meta, stamps[kept])

    def add(self, vectors, paths: list[str]) -> int:
        """Add vectors whose path is not indexed yet (the first of a path listed again); returns how
        many were added."""
        return self.add_blocks(paths, lambda: iter([np.asarray(vectors)]))

    def add_blocks(
        self, paths: list[str], blocks: Callable[[], Iterator[np.ndarray]], stamps: np.ndarray | None = None
    ) -> int:
        """`add` over vectors read a block at a time (blocks() as in `create_from_blocks`, called once); an
        image counts as indexed under any spelling of its path (`same_file_keys`)."""
        new = np.zeros(len(paths), dtype=bool)
        new[first_occurrences(same_file_keys(paths), known=set(same_file_keys(self.paths)))] = True
        if new.any():
            for block in _kept_blocks(blocks(), new):
                self.index.add(block)
            self.paths += [paths[i] for i in np.flatnonzero(new).tolist()]
            added = unknown_stamps(len(paths)) if stamps is None else np.asarray(stamps, dtype=np.int64)
            self.stamps = np.concatenate([self.stamps, added[new]])
        return int(new.sum())

    def changed_since_indexed(self, paths: list[str], stamps: np.ndarray) -> list[str]:
        """The `paths` indexed already (under any spelling) whose [size, mtime ns] `stamps` (N, 2) differ from
        those recorded when they were indexed (where both are known): images replaced under their name."""
        indexed = dict(zip(same_file_keys(self.paths), self.stamps.tolist(), strict=True))
        return [
            path
            for path, key, now in zip(paths, same_file_keys(paths), np.asarray(stamps).tolist(), strict=True)
            if key in indexed and now[0] >= 0 and indexed[key][0] >= 0 and indexed[key] != now
        ]

    def search(
        self, queries, k: int, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) cosine, descending; ids (Q, k), -1 where fewer than k were found). nprobe: the
        cells an ivf / ivfpq search visits, by default ceil(sqrt(nlist)) (faiss's own default, 1, misses
        most neighbours and can return fewer than k hits); ef_search: hnsw's search breadth."""
        params = []
        if "IVF" in self.meta["factory"]:
            nprobe = nprobe or math.ceil(math.sqrt(faiss.extract_index_ivf(self.index).nlist))
            params.append(f"nprobe={nprobe}")
        if ef_search and "HNSW" in self.meta["factory"]:
            params.append(f"efSearch={ef_search}")
        if params:
            faiss.ParameterSpace().set_index_parameters(self.index, ",".join(params))
        return self.index.search(normalise(queries), min(k, self.index.ntotal))

    # ------------------------------------------------------------------------------------ disk
    def save(self, folder: str | Path) -> None:
        """Write generation g + 1 of the files, switch index.json to it, remove the older generations
        (g, and any that a save killed after its switch left: `remove_stale_files`); atomic_write removes
        the temporary files of saves killed mid-write. A path holding a line break, which the file list
        (one path a line) cannot hold, is a DinokitError before anything is written."""
        check_listable(self.paths)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        previous = self.meta.get("generation")
        generation = 0 if previous is None else previous + 1
        atomic_write(folder / f"index-{generation}.faiss", lambda tmp: faiss.write_index(self.index, tmp))
        text = "".join(p + "\n" for p in self.paths)
        write_text(folder / f"paths-{generation}.txt", text)
        atomic_write(folder / f"stamps-{generation}.npy", lambda tmp: save_array(tmp, self.stamps))
        self.meta.update(generation=generation, count=len(self.paths))
        write_json(folder / INDEX_META, self.meta)
        remove_stale_files(folder, generation)

    @classmethod
    def load(cls, folder: str | Path) -> "FeatureIndex":
        folder = Path(folder).expanduser()
        if not (folder / INDEX_META).is_file():
            raise DinokitError(
                f"{folder} is not an index folder (no {INDEX_META}); build one with `dinokit index build`"
            )
        # build refuses a folder that holds index.json (add=true would read it): the folder goes first
        fix = f"remove {folder} and build the index again (`dinokit index build ... out={folder}`)"
        for _ in range(3):  # an add that finishes meanwhile removes the generation read: read the new one
            meta = read_json(folder / INDEX_META, fix)
            g = meta["generation"]
            index_file, paths_file = folder / f"index-{g}.faiss", folder / f"paths-{g}.txt"
            try:
                index = faiss.read_index(str(index_file))
                paths = read_paths(paths_file)
                break
            except (RuntimeError, OSError) as e:  # faiss raises RuntimeError for a missing or cut-short file
                if read_json(folder / INDEX_META, fix)["generation"] != g:
                    continue
                which = paths_file if isinstance(e, OSError) else index_file
                why = "missing" if not which.exists() else "damaged"
                raise DinokitError(f"{which} is {why}, so {folder} cannot be read: {fix}") from None
        else:
            raise DinokitError(f"{folder} changed while it was read (adds running): read it again")
        stamps = read_stamps(folder / f"stamps-{g}.npy", fix)
        if not index.ntotal == len(paths) == meta["count"] == (len(paths) if stamps is None else len(stamps)):
            raise DinokitError(f"{folder}: index ({index.ntotal}) and file list ({len(paths)}) disagree; rebuild it")
        return cls(index, paths, meta, stamps)


# an index folder's files of generation <g> (one of the groups)
INDEX_FILE = re.compile(r"index-(\d+)\.faiss|paths-(\d+)\.txt|stamps-(\d+)\.npy")


def remove_stale_files(folder: Path, generation: int) -> None:
    """Remove from an index folder the files of generations before `generation` (the current one; a
    first save removes none: such files are not an index's)."""
    for entry in folder.iterdir():
        m = INDEX_FILE.fullmatch(entry.name)
        if m is not None and int(m.group(1) or m.group(2) or m.group(3)) < generation:
            entry.unlink(missing_ok=True)


def check_listable(paths: list[str]) -> None:
    """A DinokitError naming the first path that holds a line break, which a list of image paths (one
    a line: an index's paths-<g>.txt, curation's kept.txt, paths.txt, selected.txt) cannot hold."""
    broken = next((p for p in paths if "\n" in p), None)
    if broken is not None:
        raise DinokitError(
            f"the image path {broken!r} holds a line break, which a list of image paths (one a line: an index's "
            "file list, curation's lists) cannot hold: rename the file without it and embed the images again"
        )


def read_paths(path: Path) -> list[str]:
    """The lines of a list of image paths that dinokit wrote (`dinokit.io.write_text`; split at newlines
    only: str.splitlines also splits at characters such as U+2028 or U+0085 that a file name may hold)."""
    text = read_text(path)
    return text[:-1].split("\n") if text else []


def unknown_stamps(count: int) -> np.ndarray:
    """(count, 2) int64 of -1: images whose size and mtime when embedded are not known."""
    return np.full((count, 2), -1, dtype=np.int64)


def read_stamps(path: Path, fix: str) -> np.ndarray | None:
    """An index's (N, 2) stamps-<g>.npy; None where it has none (an index made before they were recorded)."""
    if not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError):
        raise DinokitError(f"{path} is damaged, so {path.parent} cannot be read: {fix}") from None


def save_array(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, array)


def same_file_keys(paths: list[str]) -> list[str]:
    """Each path with the symlinks of its folder resolved (os.path.realpath, once per folder), so that
    the spellings of one file through a symlinked or relative folder are one key."""
    real: dict[str, str] = {}
    keys = []
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in real:
            real[folder] = os.path.realpath(folder)
        keys.append(os.path.join(real[folder], name))
    return keys


def first_occurrences(paths: list[str], known: Iterable[str] = ()) -> list[int]:
    """Positions of the paths neither in `known` nor seen earlier in `paths`."""
    seen = set(known)
    keep = []
    for i, path in enumerate(paths):
        if path not in seen:
            seen.add(path)
            keep.append(i)
    return keep


def _kept_blocks(blocks: Iterable[np.ndarray], kept: np.ndarray) -> Iterator[np.ndarray]:
    """The normalised rows of each block (n_i, D) whose entry in kept (N,) bool is True, block by block
    (blocks that hold no kept row are skipped, except a first one: its width gives the dimension)."""
    start = 0
    for block in blocks:
        if start + len(block) > len(kept):
            break
        rows = kept[start : start + len(block)]
        if rows.any() or start == 0:
            yield normalise(block if rows.all() else np.asarray(block)[rows])
        start += len(block)
    else:
        if start == len(kept):
            return
    raise DinokitError(f"the vectors and the {len(kept)} image paths disagree: embed the images again")


def training_rows(spec: str, count: int, seed: int = 0) -> np.ndarray:
    """Which of `count` vectors (indices, ascending) to train `spec` on: all of them, or where faiss would
    subsample anyway (more than TRAINING_POINTS_PER_CENTROID per IVF cell or PQ centroid) as many drawn
    at random (seeded): the vectors it would not look at need not be read into memory."""
    limit = TRAINING_POINTS_PER_CENTROID * needed_training_points(spec)  # one point per centroid is the least
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, limit, replace=False))


def needed_training_points(spec: str) -> int:
    """Fewest vectors faiss can train `spec` on: one per IVF cell and 2^bits per PQ codebook."""
    needed = 1
    for part in spec.split(","):
        if part.startswith("IVF"):
            needed = max(needed, int(part[3:]))
        if part.startswith("PQ"):
            needed = max(needed, 2 ** int(part.split("x")[1]))
    return needed
