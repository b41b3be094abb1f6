"""Scale: what a command holds in memory or does per image must not grow with the collection beyond
what its output needs. Each test runs a small case of a defect that the full CIFAR-10 (60,000 images,
docs/benchmarks.md "Scale") showed, and counts what the old code did too much of."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm import tqdm

import dinokit
from dinokit.cli import main
from dinokit.curation.dedup import deduplicate
from dinokit.curation.retrieval_sampling import seed_neighbours
from dinokit.data.transforms import eval_transform
from dinokit.eval.cache import cached_features
from dinokit.features.embed import embed
from dinokit.retrieval.commands import SHEET_QUERIES, build_index
from dinokit.retrieval.index import FeatureIndex
from tests.conftest import random_images


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """40 noise images embedded with a tiny model, and a flat index over them."""
    root = tmp_path_factory.mktemp("scale")
    random_images(root / "images", 40, 32, np.random.default_rng(0))
    torch.manual_seed(0)
    weights = dinokit.export_model(dinokit.create_model("vit_micro_p4", depth=1), root / "m.safetensors")
    embed(weights, str(root / "images"), str(root / "emb"), image_size=32, num_workers=0, progress=False)
    build_index(str(root / "emb"), str(root / "idx"))
    return root


def test_index_search_sheet_shows_a_bounded_number_of_queries(collection, tmp_path, capsys):
    """The sheet had a 146 px row per query: 1,000 queries drew a 1452 x 146,000 px PNG at a 3 GB peak
    (1 GB without the sheet), which Pillow then refuses to open (a decompression bomb). It now shows the
    first num_examples queries (32 by default) and says so; the JSON still holds every query."""
    search = ["index", "search", f"index={collection / 'idx'}", f"query={collection / 'images'}", "k=3"]
    assert main([*search, f"out={tmp_path / 'hits.json'}", f"sheet={tmp_path / 'sheet.png'}"]) == 0
    assert Image.open(tmp_path / "sheet.png").size == (4 * 132, SHEET_QUERIES * 146)
    assert f"(the first {SHEET_QUERIES} of 40 queries: num_examples=)" in capsys.readouterr().out
    assert main([*search, f"sheet={tmp_path / 'five.png'}", "num_examples=5"]) == 0
    assert Image.open(tmp_path / "five.png").size == (4 * 132, 5 * 146)
    assert main([*search, f"sheet={tmp_path / 'none.png'}", "num_examples=0"]) == 2
    assert "num_examples is the number of queries sheet= shows" in capsys.readouterr().err


def test_retrieve_with_a_subset_searches_again_only_the_seeds_that_lack_hits(monkeypatch):
    """With subset= (allowed pool ids), every seed was searched again with 4 times the k whenever one
    seed lacked per_seed allowed hits: on CIFAR-10 (60,000 seeds, dedup's kept.txt) k grew to the
    thousands for all 60,000, 63 s and a 2.0 GB peak. Now only the lacking seeds are searched again,
    and each seed still gets its exact per_seed nearest allowed images."""
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(300, 16)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    seeds = pool[:60]
    allowed = np.ones(300, dtype=bool)
    allowed[np.argsort(-(pool @ seeds[0]))[:6]] = False  # seed 0's 6 nearest (itself too) were removed
    index = FeatureIndex.create(pool, [f"{i}.png" for i in range(300)], {}, kind="flat")
    searched = []  # (queries, k) of each search
    search = FeatureIndex.search

    def counted(self, queries, k, **options):
        searched.append((len(queries), k))
        return search(self, queries, k, **options)

    monkeypatch.setattr(FeatureIndex, "search", counted)
    hits = seed_neighbours(index, seeds, per_seed=4, allowed=allowed)
    cosines = seeds @ pool.T
    for s, row in enumerate(hits):
        best = [j for j in np.argsort(-cosines[s], kind="stable") if allowed[j]][:4]
        assert [j for j, _ in row] == best
        assert np.allclose([c for _, c in row], cosines[s, best], atol=1e-5)
    lacking = searched[1][0]
    assert searched[0] == (60, 4) and 1 <= lacking < 10 and searched[1][1] == 16  # old: (60, 16) again


def test_cached_features_show_one_bar_over_every_image_to_extract(collection, tmp_path, monkeypatch):
    """The feature cache extracts a split in shards of 16,384 images, and each shard had its own bar of
    batches: CIFAR-10's train split showed `features 256/256 100%` three times and then 13/13, each
    looking like the end. Now one bar counts the split's images still to extract (those of the
    missing shards only, when an extraction resumes)."""
    bars = []

    class Recorded(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not self.disable:  # close() disables every bar: kept here are the ones shown
                bars.append(self)

    monkeypatch.setattr("dinokit.features.extract.tqdm", Recorded)
    monkeypatch.setattr("dinokit.eval.cache.tqdm", Recorded, raising=False)
    model = dinokit.load_model(collection / "m.safetensors")
    paths = sorted((collection / "images").glob("*.png"))[:10]
    options = dict(cache_dir=tmp_path, shard_size=4, batch_size=2, num_workers=0, progress=True)
    features = cached_features(model, paths, eval_transform(32, "resize"), **options)
    assert [(b.total, b.n, b.unit) for b in bars] == [
        (10, 10, "img")
    ]  # old: (2, 2, 'batch'), (2, 2, 'batch'), (1, 1, 'batch')
    shutil.rmtree(features.location / "shard-00001")
    bars.clear()
    cached_features(model, paths, eval_transform(32, "resize"), **options)
    assert [(b.total, b.n) for b in bars] == [(4, 4)]


def test_dedup_folds_its_pairs_without_sorting_them(monkeypatch):
    """A collection of copies (a random-init model's CIFAR-10 embedding: every cosine >= 0.95, 1.8
    billion pairs) is folded into one edge per linked item every max(N, chunk^2) pairs; each fold found
    the linked items with np.union1d, a hash of all 2P ids that took half of the 3-minute run. A mask of
    N flags gives the same items. Here 3 groups of copies, folded many times at chunk_size 8."""

    def refused(*args, **kwargs):
        raise AssertionError("the fold hashed or sorted the pairs")

    monkeypatch.setattr(np, "union1d", refused)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    x = centres[np.arange(90) % 3] + 1e-4 * rng.normal(size=(90, 8))
    result = deduplicate(x, threshold=0.99, chunk_size=8)
    assert result.keep.tolist() == [0, 1, 2]
    assert result.duplicate_of.tolist() == (np.arange(90) % 3).tolist()
