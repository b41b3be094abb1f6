"""Defects found reviewing curation and the retrieval index as a user curating tens of millions of images:
each test failed before its fix. Embedding folders are written directly (shards + manifest, as `dinokit
embed` writes them) with vectors set by hand, so every expected value is exact."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dinokit.curation.commands import cluster, retrieve
from dinokit.errors import DinokitError
from dinokit.features.store import MANIFEST, shard_path, write_shard
from dinokit.io import write_json

EMBEDDING = {
    "model": "/models/m.safetensors",
    "architecture": {"embed_dim": 8},
    "weights_hash": "0123abcd",
    "image_size": [32, 32],
    "resize_policy": "center_crop",
    "transform": "Resize -> CenterCrop -> Normalize",
    "precision": "fp32",
}


def embedding_folder(
    out: Path, features: dict[str, np.ndarray], paths: list[str] | None = None, shard: int = 0, dtype: str = "float32"
) -> list[str]:
    """An embedding folder at `out` holding `features` ({kind: (N, D)}) in shards of `shard` rows (0: one
    shard) of `dtype`; returns its image paths (/data/img<i>.jpg unless given)."""
    n = len(next(iter(features.values())))
    paths = paths or [f"/data/img{i:04d}.jpg" for i in range(n)]
    out.mkdir(parents=True)
    shards = []
    for number, start in enumerate(range(0, n, shard or n)):
        end = min(n, start + (shard or n))
        file = shard_path(out, number, "safetensors")
        chunk = {k: torch.from_numpy(np.asarray(v[start:end], dtype=np.float32)) for k, v in features.items()}
        write_shard(file, chunk, paths[start:end], [], dtype)
        shards.append({"file": file.name, "count": end - start, "bad": 0})
    write_json(
        out / MANIFEST,
        {**EMBEDDING, "features": list(features), "dtype": dtype, "format": "safetensors", "shards": shards},
    )
    return paths


def unit(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------
def test_retrieve_refuses_clusters_made_from_another_feature(tmp_path):
    # the clusters were fitted on patch_mean vectors; seeds' cls vectors were matched to those centroids
    # silently (retrieve checked the embedding, not the feature), as an index pool= already refuses
    rng = np.random.default_rng(0)
    embedding_folder(tmp_path / "emb", {"cls": unit(rng, 12), "patch_mean": unit(rng, 12)})
    cluster(str(tmp_path / "emb"), str(tmp_path / "clusters"), n_clusters=[3], feature="patch_mean", device="cpu")
    with pytest.raises(DinokitError, match=r"patch_mean vectors.*pass feature=patch_mean"):
        retrieve(str(tmp_path / "emb"), str(tmp_path / "ret"), clusters=str(tmp_path / "clusters"), feature="cls")
    assert not (tmp_path / "ret").exists()
    summary = retrieve(
        str(tmp_path / "emb"), str(tmp_path / "ret"), clusters=str(tmp_path / "clusters"), feature="patch_mean"
    )
    assert summary["seed_images"] == 12
    assert json.loads((tmp_path / "ret" / "curation.json").read_text())["clusters"] == str(tmp_path / "clusters")


def test_similarity_png_counts_exact_copies_whose_float32_cosine_rounds_above_one(tmp_path, monkeypatch):
    # identical vectors' float32 cosines come out at 1 + 1.2e-7 about a third of the time; the histogram's
    # range ended at 1.0, so exactly the copies a user looks for were left out of its bars
    from dinokit.curation import commands

    figures = []
    monkeypatch.setattr(commands, "save_figure", lambda path, fig: figures.append(fig))
    above_one = np.nextafter(np.float32(1), np.float32(2))
    nearest = np.array([0.5, 0.97, 1.0, above_one, above_one, np.nan], np.float32)
    commands.similarity_histogram(nearest, 0.95, tmp_path / "similarity.png")
    bars = figures[0].axes[0].patches
    assert sum(bar.get_height() for bar in bars) == 5
    assert max(bars, key=lambda bar: bar.get_x()).get_height() == 3  # 1.0 and the two above it: the top bin


MEMORY_PROBE = """
import sys
from dinokit.curation.commands import read_unique_vectors
from dinokit.curation.vectors import unit_rows


def peak():  # this process's peak resident memory in bytes (ru_maxrss would include the parent's: fork)
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    return int(status.split()[0]) * 1024


before = peak()
vectors, paths, _ = read_unique_vectors(sys.argv[1], "cls")
unit_rows(vectors, "x")  # what deduplicate does first
print((peak() - before) / vectors.nbytes)
"""


def test_reading_an_embedding_for_curation_holds_one_copy_of_the_vectors(tmp_path):
    # the shards, their concatenation, its float32 copy, a de-duplicated copy, a normalised copy and
    # deduplicate's own normalised copy: peak memory was 3.1 times the N x D float32 vectors (93 GB for
    # 10 million 768-D vectors), now one array filled shard by shard and normalised in place
    import subprocess
    import sys

    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the peak memory from /proc (Linux)")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120_000, 256)).astype(np.float32)
    embedding_folder(tmp_path / "emb", {"cls": x}, shard=8_000, dtype="float16")
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "emb")], capture_output=True, text=True, check=True
    )
    assert float(probe.stdout) < 1.6, probe.stdout  # the array itself, one shard and the read's temporaries


def test_read_vectors_fills_one_array_in_image_order_across_shards(tmp_path):
    from dinokit.retrieval.commands import read_vectors

    x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    paths = embedding_folder(tmp_path / "emb", {"cls": x}, shard=3)
    vectors, read, embedding = read_vectors(tmp_path / "emb")
    np.testing.assert_array_equal(vectors, x)
    assert read == paths and embedding["weights_hash"] == "0123abcd"
    manifest = json.loads((tmp_path / "emb" / MANIFEST).read_text())
    manifest["shards"][1]["count"] = 2  # a shard replaced after the run finished
    write_json(tmp_path / "emb" / MANIFEST, manifest)
    with pytest.raises(DinokitError, match="disagree on the number of images"):
        read_vectors(tmp_path / "emb")
