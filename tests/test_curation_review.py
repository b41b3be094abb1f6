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
        {
            **EMBEDDING,
            "features": list(features),
            "feature_shapes": {k: list(np.shape(v)[1:]) for k, v in features.items()},
            "dtype": dtype,
            "format": "safetensors",
            "shards": shards,
        },
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


def peak_memory_ratio(setup: str, call: str, folder: Path) -> float:
    """In a fresh process: how much its peak resident memory grows while `call` runs, in units of the N x D
    float32 vectors of the embedding `folder` (`setup`: imports; ru_maxrss would include pytest's, by fork)."""
    import subprocess
    import sys

    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the peak memory from /proc (Linux)")
    probe = f"""
import sys
from dinokit.features.store import read_manifest
{setup}


def peak():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024


manifest = read_manifest(sys.argv[1])
nbytes = sum(s["count"] for s in manifest["shards"]) * manifest["feature_shapes"]["cls"][0] * 4
before = peak()
{call}
print((peak() - before) / nbytes)
"""
    result = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True, check=True)
    return float(result.stdout)


@pytest.fixture(scope="module")
def large_embedding(tmp_path_factory) -> Path:
    """120,000 x 256 vectors (123 MB as float32) stored as float16 in shards of 2,000 (the temporaries of
    a shard, which malloc keeps for reuse, are then small beside them)."""
    folder = tmp_path_factory.mktemp("large") / "emb"
    x = np.random.default_rng(0).normal(size=(120_000, 256)).astype(np.float32)
    embedding_folder(folder, {"cls": x}, shard=2_000, dtype="float16")
    return folder


def test_reading_an_embedding_for_curation_holds_one_copy_of_the_vectors(large_embedding):
    # the shards, their concatenation, its float32 copy, a de-duplicated copy, a normalised copy and
    # deduplicate's own normalised copy: peak memory was 3.2 times the N x D float32 vectors (98 GB for
    # 10 million 768-D vectors), now one array filled shard by shard and normalised in place
    setup = "from dinokit.curation.commands import read_unique_vectors\nfrom dinokit.curation.vectors import unit_rows"
    call = 'unit_rows(read_unique_vectors(sys.argv[1], "cls")[0], "x")  # what dedup does first'
    assert peak_memory_ratio(setup, call, large_embedding) < 1.6  # the array, a shard and the read's temporaries


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


# ---------------------------------------------------------------------------------------------------
def test_index_build_holds_the_index_and_one_shard_not_every_vector(large_embedding, tmp_path):
    # build_index read every shard into one array, then FeatureIndex.create took a de-duplicated copy and
    # a normalised copy before faiss its own: 3.2 times the vectors at the peak (98 GB for a flat index of
    # 10 million 768-D vectors, itself 31 GB), and 3.6 times for an ivfpq index of 16 bytes per vector.
    # Now the shards are added one at a time, after training on the rows faiss would use
    setup = "from dinokit.retrieval.commands import build_index"
    flat = f'build_index(sys.argv[1], "{tmp_path / "flat"}")'
    # the flat index holds a copy (1; faiss grows it by doubling), the paths (0.09) and a few shards: 1.4
    assert peak_memory_ratio(setup, flat, large_embedding) < 1.8
    # 16,384 training rows (0.13), 16-byte codes (0.02), the paths, faiss's training and a few shards:
    # 0.71-0.86 in six fresh processes, but once 1.25 in a full-suite run (faiss's k-means training
    # varies), so the bound sits between that and the old 3.6
    ivfpq = f'build_index(sys.argv[1], "{tmp_path / "ivfpq"}", kind="ivfpq", nlist=64, pq_m=16, pq_bits=6)'
    assert peak_memory_ratio(setup, ivfpq, large_embedding) < 2.0


def test_an_index_built_shard_by_shard_is_the_index_built_at_once(tmp_path):
    from dinokit.retrieval.commands import build_index
    from dinokit.retrieval.index import FeatureIndex, training_rows

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16))
    x = (centres[rng.integers(0, 10, 700)] + 0.3 * rng.normal(size=(700, 16))).astype(np.float32)
    paths = [f"/data/img{i:04d}.jpg" for i in range(700)]
    paths[650] = paths[3]  # listed twice: its first vector is indexed
    embedding_folder(tmp_path / "emb", {"cls": x}, paths=paths, shard=128)
    queries = x[::7] + 0.05
    for kind, options in [("flat", {}), ("hnsw", {}), ("ivf", {"nlist": 8}), ("ivfpq", {"nlist": 4, "pq_bits": 4})]:
        build_index(str(tmp_path / "emb"), str(tmp_path / kind), kind=kind, **options)
        streamed = FeatureIndex.load(tmp_path / kind)
        at_once = FeatureIndex.create(x, paths, {}, kind=kind, **options)
        assert streamed.paths == at_once.paths == paths[:650] + paths[651:]
        for a, b in zip(streamed.search(queries, 5), at_once.search(queries, 5), strict=True):
            np.testing.assert_array_equal(a, b)
    # faiss trains on at most 256 rows per centroid: beyond that, a seeded sample of that many is read
    np.testing.assert_array_equal(training_rows("IVF8,Flat", 2048), np.arange(2048))
    sample = training_rows("IVF8,PQ4x2", 5000)  # max(8 cells, 4 PQ centroids) x 256
    assert len(sample) == 2048 and len(np.unique(sample)) == 2048 and (np.diff(sample) > 0).all()
    np.testing.assert_array_equal(sample, training_rows("IVF8,PQ4x2", 5000))
    assert len(training_rows("PQ16x8", 10**6)) == 256 * 256


def test_python_callers_get_dinokit_errors_or_results_for_the_cli_s_plain_values(tmp_path):
    # the CLI turns n_clusters=4 into [4] and refuses per_seed=2.5; from Python, cluster(n_clusters=4) and
    # hierarchical_kmeans(x, 4) were TypeErrors ('int' object is not subscriptable / iterable), and
    # per_seed=2.5 a TypeError from numpy's choice or faiss's search
    from dinokit.curation.kmeans import hierarchical_kmeans
    from dinokit.curation.retrieval_sampling import seed_cluster_samples, seed_neighbours
    from dinokit.retrieval.index import FeatureIndex

    rng = np.random.default_rng(0)
    x = unit(rng, 30)
    embedding_folder(tmp_path / "emb", {"cls": x})
    summary = cluster(str(tmp_path / "emb"), str(tmp_path / "clusters"), n_clusters=4, device="cpu")
    assert summary["n_clusters"] == [4] and summary["levels"][0]["clusters"] == 4
    levels = hierarchical_kmeans(x, 4)
    np.testing.assert_array_equal(levels[0].assignment, hierarchical_kmeans(x, [4])[0].assignment)
    index = FeatureIndex.create(x, [f"{i}.png" for i in range(30)], {})
    for per_seed in (2.5, 0, True, "2"):
        with pytest.raises(DinokitError, match="per_seed must be a positive number"):
            seed_neighbours(index, x[:2], per_seed)
        with pytest.raises(DinokitError, match="per_seed must be a positive number"):
            seed_cluster_samples(levels[0].centroids, levels[0].assignment, x[:2], per_seed, rng)
        with pytest.raises(DinokitError, match="per_seed must be a positive number"):
            retrieve(str(tmp_path / "emb"), str(tmp_path / "ret"), pool=str(tmp_path / "emb"), per_seed=per_seed)
    assert len(seed_neighbours(index, x[:2], np.int64(3))[0]) == 3


LOCALE_PROBE = """
import sys
from pathlib import Path
from dinokit.curation.commands import write_paths
from dinokit.retrieval.index import FeatureIndex, read_paths
import numpy as np

folder, paths = Path(sys.argv[1]), ["/data/caf\\u00e9.jpg", "/data/a\\u2028b.jpg", "/data/\\u732b.jpg"]
write_paths(folder / "kept.txt", paths)
assert (folder / "kept.txt").read_bytes().decode("utf-8").split("\\n")[:-1] == paths
FeatureIndex.create(np.eye(3, dtype=np.float32), paths, {}).save(folder / "idx")
assert FeatureIndex.load(folder / "idx").paths == paths
assert read_paths(folder / "kept.txt") == paths
print("ok")
"""


def test_path_lists_are_utf8_whatever_the_locale_and_split_at_newlines_only(tmp_path):
    # kept.txt / selected.txt / paths.txt and an index's paths-<g>.txt were written in the locale's encoding
    # (an ASCII or Latin-1 locale: UnicodeEncodeError for a Chinese file name) while lists are read as UTF-8;
    # paths.txt and the index's list were split with str.splitlines, which also splits at U+2028 (the index
    # of a file holding one then said "index (3) and file list (4) disagree; rebuild it")
    import os
    import subprocess
    import sys

    env = {**os.environ, "LC_ALL": "POSIX", "PYTHONUTF8": "0"}
    probe = subprocess.run(
        [sys.executable, "-X", "utf8=0", "-c", LOCALE_PROBE, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert probe.stdout.strip() == "ok", probe.stderr[-2000:]


def test_a_level_with_sample_size_one_is_not_resampled_as_in_ssl_data_curation():
    # ssl-data-curation resamples a level only if its sample_size is > 1 (its production config: level 1 with
    # n_resampling_steps 1, sample_size 1, i.e. plain k-means); dinokit ran a k-means on the closest member of
    # each cluster, which put every level-1 centroid on a data point and re-assigned the whole level
    from dinokit.curation.kmeans import hierarchical_kmeans

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(12, 8))[rng.integers(0, 12, 600)] + 0.5 * rng.normal(size=(600, 8))).astype(np.float32)
    plain = hierarchical_kmeans(x, [40, 6], n_resamples=[0, 3], sample_size=[1, 3], seed=0)
    production = hierarchical_kmeans(x, [40, 6], n_resamples=[1, 3], sample_size=[1, 3], seed=0)
    for a, b in zip(plain, production, strict=True):
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.assignment, b.assignment)
    on_points = np.isclose(((production[0].centroids[:, None] - x[None]) ** 2).sum(-1).min(axis=1), 0, atol=1e-9)
    assert on_points.sum() < 40  # k-means means, not members (all 40 sat on data points before)


def test_vectors_too_large_for_the_gpu_are_refused_naming_device_cpu(monkeypatch):
    # device=auto picks a GPU, and dedup and k-means copy every vector to it: 100 million 768-D vectors
    # (286 GiB) on an 80 GB GPU ended in torch.OutOfMemoryError's traceback, which does not say device=cpu
    from dinokit.curation.dedup import deduplicate
    from dinokit.curation.kmeans import hierarchical_kmeans

    free = 4096  # bytes: a GPU that is full (patched; runs without one)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    x = unit(np.random.default_rng(0), 200, 8)  # 6400 bytes
    with pytest.raises(DinokitError, match=r"the vectors \(0.0 GiB, 200 x 8 float32\) do not fit .*device=cpu"):
        deduplicate(x, 0.95, device="cuda")
    with pytest.raises(DinokitError, match=r"do not fit in the free memory of cuda .*pass device=cpu"):
        hierarchical_kmeans(x, [4], device="cuda")
    with pytest.raises(DinokitError, match=r"the reference vectors \(0.0 GiB, 150 x 8"):
        free = 4000  # the 3200 bytes of x[:100] would fit
        deduplicate(x[:100], 0.95, reference=unit(np.random.default_rng(1), 150, 8), device="cuda")


def test_an_index_pool_with_subset_keeps_deduplicated_copies_of_the_evaluation_set_out(tmp_path):
    # README: pool= an index folder for pools of millions, and subset=dedup/kept.txt so that copies of the
    # evaluation set dedup removed do not come back; the two could not be combined (subset= was refused
    # for an index, naming a fix `dinokit index build` does not have), so an index pool brought the
    # removed copy of a test image straight back as its seed's nearest neighbour
    from dinokit.curation.commands import dedup
    from dinokit.retrieval.commands import build_index

    rng = np.random.default_rng(0)
    pool, test = unit(rng, 40, 16), unit(rng, 3, 16)
    pool[7] = test[1]  # a copy of a test image in the pool
    paths = embedding_folder(tmp_path / "pool", {"cls": pool}, shard=16)
    embedding_folder(tmp_path / "test", {"cls": test}, paths=[f"/test/t{i}.jpg" for i in range(3)])
    dedup(str(tmp_path / "pool"), str(tmp_path / "dedup"), reference=str(tmp_path / "test"), device="cpu")
    kept = (tmp_path / "dedup" / "kept.txt").read_text().splitlines()
    assert paths[7] not in kept and len(kept) == 39
    build_index(str(tmp_path / "pool"), str(tmp_path / "index"))
    summary = retrieve(
        str(tmp_path / "test"), str(tmp_path / "ret"), pool=str(tmp_path / "index"),
        subset=str(tmp_path / "dedup" / "kept.txt"), per_seed=3,
    )  # fmt: skip
    selected = (tmp_path / "ret" / "selected.txt").read_text().splitlines()
    cosines = test @ pool.T
    cosines[:, 7] = -np.inf  # the removed copy
    truth = sorted({paths[j] for j in np.argsort(-cosines, axis=1)[:, :3].ravel().tolist()})
    assert selected == truth and summary["pool_images"] == 39
    hits = json.loads((tmp_path / "ret" / "retrieved.json").read_text())
    assert [len(h["hits"]) for h in hits] == [3, 3, 3]
