"""Embeddings on disk: shard files and the manifest that `dinokit embed` writes, and reading them back.

A run folder holds
  manifest.json             model and its weights hash, resolution, transform, features and shapes, dtype,
                            shards, bad files
  embed_config.json         the settings (checked when a run resumes), the listing of data= the shards
                            split, and earlier_shards: those of earlier runs kept before its new images
  shard_00000.safetensors   (or .npz) one shard: a tensor per feature kind, its image paths, its bad files,
                            and the [size, mtime ns] of each of its files when they were read (`file_stamps`)
  ...
Every shard is one file, written atomically: it either holds all its images or does not exist.
Tensors in a shard (n = images of the shard):
  cls (n, D), patch_mean (n, D), registers (n, R, D), patch_tokens (n, H/p, W/p, D), layers (n, L, D),
  layer_patch_tokens (n, L, H/p, W/p, D).
"""

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dinokit.errors import DinokitError
from dinokit.io import atomic_write, read_json

SHARD_FORMATS = {"safetensors": ".safetensors", "numpy": ".npz"}
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MANIFEST = "manifest.json"
CONFIG = "embed_config.json"  # the settings of a run, written before its first shard
# a manifest's settings that vectors compared with its own (queries, another embedding) must share
# (weights_hash: see dinokit.eval.backbone.weights_hash; absent from embeddings made before it was recorded)
EMBEDDING_KEYS = ("model", "architecture", "weights_hash", "image_size", "resize_policy", "transform", "precision")


def shard_path(folder: Path, index: int, format: str) -> Path:
    return folder / f"shard_{index:05d}{SHARD_FORMATS[format]}"


def write_shard(
    path: Path,
    features: dict[str, torch.Tensor],
    paths: list[str],
    bad: list[str],
    dtype: str,
    stamps: list[list[int]] | None = None,
) -> None:
    """Atomically write one shard: the features (cast to `dtype`), the image paths they belong to (in
    order), the files of this shard that could not be read, and `stamps`: [size, mtime ns] of each of
    `paths`, then of each of `bad`, taken before they were read (None: not recorded)."""
    tensors = {k: v.to(STORE_DTYPES[dtype]).contiguous() for k, v in features.items()}
    if path.suffix == ".npz":
        arrays = {k: v.numpy() for k, v in tensors.items()}
        arrays.update(paths=np.array(paths, dtype=str), bad=np.array(bad, dtype=str))
        if stamps is not None:
            arrays["stamps"] = np.array(stamps, dtype=np.int64).reshape(-1, 2)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, **arrays)

        atomic_write(path, write)
    else:
        metadata = {"paths": json.dumps(paths), "bad": json.dumps(bad)}
        if stamps is not None:
            metadata["stamps"] = json.dumps(stamps)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


@contextlib.contextmanager
def damaged_shard(path: Path) -> Iterator[None]:
    """A shard that cannot be parsed (dinokit writes whole shards; e.g. one cut short by an interrupted
    copy of the folder) or is missing is a DinokitError naming it, instead of the reader's traceback."""
    try:
        yield
    except FileNotFoundError:
        raise DinokitError(f"{path} is missing; run the same `dinokit embed` again to compute it") from None
    except OSError:
        raise
    except Exception as e:
        raise DinokitError(f"{path} is damaged ({e}); run the same `dinokit embed` again to compute it again") from None


def read_shard_index(path: Path) -> tuple[list[str], list[str]]:
    """(image paths, bad files) of a shard, without reading its tensors."""
    with damaged_shard(path):
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return z["paths"].tolist(), z["bad"].tolist()
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        return json.loads(meta["paths"]), json.loads(meta["bad"])


def read_shard_stamps(path: Path) -> list[list[int]] | None:
    """The [size, mtime ns] of each of a shard's files when they were read (its image paths, then its bad
    files), or None for a shard written before dinokit recorded them."""
    with damaged_shard(path):
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return z["stamps"].tolist() if "stamps" in z.files else None
        with safe_open(str(path), framework="pt") as f:
            stamps = f.metadata().get("stamps")
        return None if stamps is None else json.loads(stamps)


def read_shard(path: Path, kinds: list[str] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({kind: tensor}, image paths) of one shard; `kinds` None reads every feature kind."""
    with damaged_shard(path):
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                names = [k for k in z.files if k not in ("paths", "bad", "stamps")]
                feats = {k: torch.from_numpy(z[k]) for k in names if kinds is None or k in kinds}
                return feats, z["paths"].tolist()
        with safe_open(str(path), framework="pt") as f:
            feats = {k: f.get_tensor(k) for k in f.keys() if kinds is None or k in kinds}  # noqa: SIM118
            return feats, json.loads(f.metadata()["paths"])


def read_manifest(folder: str | Path) -> dict:
    """The manifest of an embedding run folder (a clear error if the run is missing or unfinished)."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not folder.is_dir():
        what = "a file" if folder.exists() else "not there"
        raise DinokitError(f"{folder} is {what}: pass the folder that `dinokit embed ... out=` wrote")
    if not path.is_file():
        if any(folder.iterdir()) and not (folder / CONFIG).is_file():  # no embed ever wrote here
            raise DinokitError(
                f"{folder} is not a `dinokit embed` folder (no {MANIFEST}, no {CONFIG}): pass the folder that "
                f"`dinokit embed ... out=` wrote, or embed its images first: "
                f"dinokit embed model=M data={folder} out=EMB"
            )
        hint = " (the run has not finished: run the same `dinokit embed` again to resume)"
        raise DinokitError(f"{path} not found: not a finished `dinokit embed` folder{hint}")
    return read_json(path, "remove it and run the same `dinokit embed` again (its finished shards are kept)")


def read_embeddings(folder: str | Path, kinds: list[str] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """All shards of a finished run, concatenated in shard order (the listing of data=, and after it the
    images an extended run added): ({kind: tensor (N, ...)}, paths)."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    missing = sorted(set(kinds or []) - set(manifest["features"]))
    if missing:
        raise DinokitError(f"{folder} has no {missing} features (it has {', '.join(manifest['features'])})")
    chunks: dict[str, list[torch.Tensor]] = {}
    paths: list[str] = []
    for shard in manifest["shards"]:
        feats, shard_paths = read_shard(folder / shard["file"], kinds)
        paths += shard_paths
        for k, v in feats.items():
            chunks.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in chunks.items()}, paths
