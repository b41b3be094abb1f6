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
