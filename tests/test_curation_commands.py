"""`dinokit curate ...` on real `dinokit embed` folders whose vectors are set by hand, so that every
expected duplicate, neighbour and cluster is known exactly."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.cli import main
from dinokit.curation.commands import cluster, dedup, read_clusters, retrieve, sample
from dinokit.curation.retrieval_sampling import seed_cluster_samples
from dinokit.data.images import list_images
from dinokit.errors import DinokitError
from dinokit.features.embed import embed
from dinokit.features.store import read_manifest, read_shard, write_shard
from dinokit.io import write_json
from dinokit.retrieval.commands import build_index
from tests.conftest import random_images

DIM = 96  # vit_micro_p4's width


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Embedding folders of 12 pool and 4 seed images (a tiny model, fp32), and a copy of the seeds'
    embedding made with another model."""
    root = tmp_path_factory.mktemp("curation")
    rng = np.random.default_rng(0)
    for part, count in (("pool", 12), ("seeds", 4)):
        random_images(root / part, count, 32, rng)
    for name, seed in (("m", 0), ("other", 1)):
        torch.manual_seed(seed)
        dinokit.export_model(dinokit.create_model("vit_micro_p4", depth=1), root / f"{name}.safetensors")
    args = dict(image_size=32, num_workers=0, progress=False, precision="fp32")
    for part in ("pool", "seeds"):
        embed(str(root / "m.safetensors"), str(root / part), str(root / f"emb_{part}"), **args)
    embed(str(root / "other.safetensors"), str(root / "seeds"), str(root / "emb_seeds_other"), **args)
    return root


def with_vectors(source: Path, out: Path, vectors: np.ndarray) -> tuple[Path, list[str]]:
    """A copy of the embedding folder `source` whose CLS vectors are `vectors` (one shard); its paths."""
    shutil.copytree(source, out)
    manifest = read_manifest(out)
    shard = out / manifest["shards"][0]["file"]
    _, paths = read_shard(shard)
    write_shard(shard, {"cls": torch.from_numpy(vectors.astype(np.float32))}, paths, [], "float32")
    return out, paths


def unit(rng, n):
    x = rng.normal(size=(n, DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(v, rng, cos):
    """A unit vector at cosine `cos` to the unit vector v."""
    r = rng.normal(size=DIM)
    r -= (r @ v) * v
    r /= np.linalg.norm(r)
    return cos * v + np.sqrt(1 - cos**2) * r


@pytest.fixture
def pool(embedded, tmp_path):
    """Pool vectors: 3 and 7 are near-copies of 0 (cosine 0.99), 6 an exact copy of 5, the rest
    random in 96-D (cosines about 0 +- 0.3)."""
    rng = np.random.default_rng(1)
    x = unit(rng, 12)
    x[3], x[7] = near(x[0], rng, 0.99), near(x[0], rng, 0.99)
    x[6] = x[5]
    return (*with_vectors(embedded / "emb_pool", tmp_path / "pool", x), x)


def read_lines(path):
    return Path(path).read_text().splitlines()


def test_dedup_keeps_the_first_of_each_group_and_says_what_each_removed_image_copies(pool, embedded, tmp_path):
    folder, paths, x = pool
    seeds = x[[9, 1, 2, 4]].copy()  # seed 0 is pool image 9 itself; the others are unrelated
    seeds[1:] = unit(np.random.default_rng(2), 3)
    reference, ref_paths = with_vectors(embedded / "emb_seeds", tmp_path / "ref", seeds)

    summary = dedup(str(folder), str(tmp_path / "out"), threshold=0.95, reference=str(reference))

    assert read_lines(tmp_path / "out" / "kept.txt") == [paths[i] for i in (0, 1, 2, 4, 5, 8, 10, 11)]
    removed = json.loads((tmp_path / "out" / "removed.json").read_text())
    assert [(r["path"], r["duplicate_of"], r["reason"]) for r in removed] == [
        (paths[3], paths[0], "duplicate"),
        (paths[6], paths[5], "duplicate"),
        (paths[7], paths[0], "duplicate"),
        (paths[9], ref_paths[0], "reference"),
    ]
    assert [r["score"] for r in removed] == pytest.approx([0.99, 1.0, 0.99, 1.0], abs=1e-5)
    assert summary["kept"] == 8 and summary["removed_duplicates"] == 3 and summary["removed_reference"] == 1
    assert summary["groups"] == 2
    assert json.loads((tmp_path / "out" / "curation.json").read_text())["kept"] == 8
    for picture in ("similarity.png", "duplicates.png"):
        with Image.open(tmp_path / "out" / picture) as image:
            assert image.width > 100 and image.height > 100
    # the kept list is a data list that pretraining and embedding read
    assert [str(p) for p in list_images(tmp_path / "out" / "kept.txt")] == read_lines(tmp_path / "out" / "kept.txt")


def test_dedup_through_the_command_line(pool, tmp_path, capsys):
    folder, _, _ = pool
    assert main(["curate", "dedup", f"features={folder}", f"out={tmp_path / 'out'}", "threshold=0.98"]) == 0
    assert "kept 9, removed 3 near-duplicates (in 2 groups)" in capsys.readouterr().out
    # at 0.995 the near-copies at 0.99 stay, the exact copy goes
    assert main(["curate", "dedup", f"features={folder}", f"out={tmp_path / 'out'}", "threshold=0.995"]) == 0
    assert len(read_lines(tmp_path / "out" / "kept.txt")) == 11
    assert main(["curate", "dedup", f"features={folder}", f"out={tmp_path / 'cpu'}", "device=cpu"]) == 0
    # a device that is not one fails before any work, and out= is not created
    assert main(["curate", "dedup", f"features={folder}", f"out={tmp_path / 'gpu'}", "device=gpu"]) != 0
    assert "device=gpu is not a device name (a GPU is device=cuda)" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists()


def test_a_curation_folder_is_replaced_whole_and_a_folder_of_other_files_is_refused(pool, tmp_path):
    folder, _, _ = pool
    out = tmp_path / "out"
    dedup(str(folder), str(out), threshold=0.95)
    assert (out / "duplicates.png").is_file()
    dedup(str(folder), str(out), threshold=0.95, num_examples=0)  # a rerun leaves no file of the first run
    assert not (out / "duplicates.png").exists() and (out / "kept.txt").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DinokitError, match="not the output of a `dinokit curate` step"):
        dedup(str(folder), str(mine))
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1


def test_sets_embedded_by_different_models_are_refused(pool, embedded, tmp_path):
    folder, _, _ = pool
    with pytest.raises(DinokitError, match="embedded differently \\(model, weights_hash differ; model: "):
        dedup(str(folder), str(tmp_path / "out"), reference=str(embedded / "emb_seeds_other"))
    with pytest.raises(DinokitError, match="embedded differently"):
        retrieve(str(embedded / "emb_seeds_other"), str(tmp_path / "out"), pool=str(folder))
    assert not (tmp_path / "out").exists()


def test_retrieve_selects_the_union_of_each_seeds_nearest_pool_images(pool, embedded, tmp_path):
    folder, paths, x = pool
    rng = np.random.default_rng(3)
    seeds = unit(rng, 4)
    seeds[0] = near(x[10], rng, 0.9)
    seeds[1] = near(x[10], rng, 0.8)  # shares its nearest image with seed 0
    seeds_folder, seed_paths = with_vectors(embedded / "emb_seeds", tmp_path / "seeds", seeds)
    cosines = seeds @ x.T
    truth = np.argsort(-cosines, axis=1)[:, :2]

    retrieve(str(seeds_folder), str(tmp_path / "out"), pool=str(folder), per_seed=2)

    assert read_lines(tmp_path / "out" / "selected.txt") == [paths[i] for i in sorted(set(truth.ravel().tolist()))]
    record = json.loads((tmp_path / "out" / "retrieved.json").read_text())
    assert [r["seed"] for r in record] == seed_paths
    assert [[h["path"] for h in r["hits"]] for r in record] == [[paths[j] for j in row] for row in truth]
    assert [h["score"] for h in record[0]["hits"]] == pytest.approx(np.sort(cosines[0])[::-1][:2], abs=1e-5)
    # min_score keeps only the close hits; an index folder over the pool gives the same as the embedding
    build_index(str(folder), str(tmp_path / "index"))
    retrieve(str(seeds_folder), str(tmp_path / "out"), pool=str(tmp_path / "index"), per_seed=2, min_score=0.75)
    assert read_lines(tmp_path / "out" / "selected.txt") == [paths[10]]


def test_retrieve_needs_exactly_one_of_pool_and_clusters(pool, embedded, tmp_path):
    folder, _, _ = pool
    with pytest.raises(DinokitError, match="pass either pool="):
        retrieve(str(embedded / "emb_seeds"), str(tmp_path / "out"))
    with pytest.raises(DinokitError, match="not both"):
        retrieve(str(embedded / "emb_seeds"), str(tmp_path / "out"), pool=str(folder), clusters=str(folder))
    with pytest.raises(DinokitError, match="min_score applies to pool="):
        retrieve(str(embedded / "emb_seeds"), str(tmp_path / "out"), clusters=str(folder), min_score=0.5)


def test_seeds_sharing_a_cluster_draw_different_images_and_a_small_cluster_gives_all():
    centroids = np.eye(3, dtype=np.float32)  # clusters along the three axes
    assignment = np.array([0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2])
    seeds = np.array([[1, 0.1, 0], [2, 0, 0.3], [0, 1, 0]], dtype=np.float32)  # two seeds near axis 0, one near 1
    clusters, drawn = seed_cluster_samples(centroids, assignment, seeds, 2, np.random.default_rng(0))
    assert clusters.tolist() == [0, 0, 1]
    assert sorted(drawn) == [0, 1]
    assert len(drawn[0]) == 4 and len(set(drawn[0].tolist())) == 4 and set(drawn[0].tolist()) <= set(range(6))
    assert drawn[1].tolist() == [6]  # 2 asked of a cluster of 1: all of it
    again = seed_cluster_samples(centroids, assignment, seeds, 2, np.random.default_rng(0))[1]
    assert all(np.array_equal(drawn[c], again[c]) for c in drawn)
    with pytest.raises(DinokitError, match="per_seed must be a positive"):
        seed_cluster_samples(centroids, assignment, seeds, 0, np.random.default_rng(0))


@pytest.fixture
def concepts(embedded, tmp_path):
    """Pool vectors in three concepts: images 0-7 around A, 8-9 around B, 10-11 around C (cosine 0.95
    to their concept, the concepts orthogonal)."""
    rng = np.random.default_rng(4)
    axes = np.eye(DIM)[:3]
    x = np.stack([near(axes[0 if i < 8 else 1 if i < 10 else 2], rng, 0.95) for i in range(12)])
    return (*with_vectors(embedded / "emb_pool", tmp_path / "concepts", x), x)


def test_cluster_then_sample_gives_small_concepts_their_share(concepts, tmp_path):
    folder, paths, _ = concepts
    summary = cluster(str(folder), str(tmp_path / "clusters"), n_clusters=[3], n_resamples=0)
    levels, cluster_paths, meta = read_clusters(tmp_path / "clusters")
    assert cluster_paths == paths and meta["step"] == "cluster"
    groups = [set(np.flatnonzero(levels[0].assignment == c).tolist()) for c in range(3)]
    assert sorted(groups, key=min) == [set(range(8)), {8, 9}, {10, 11}]
    assert summary["levels"][0]["images_per_cluster"] == {"min": 2, "median": 2.0, "max": 8}
    assert summary["sample_size"] == [2]  # the default: half the average cluster size, 12 / 3 / 2
    assert summary["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # device=auto
    with Image.open(tmp_path / "clusters" / "cluster_sizes.png") as image:
        assert image.width > 100

    # 6 of 12: water-filling over clusters of 8, 2 and 2 gives 2 each, so B and C are taken whole
    sample(str(tmp_path / "clusters"), str(tmp_path / "sample"), target_size=6, seed=1)
    selected = [paths.index(p) for p in read_lines(tmp_path / "sample" / "selected.txt")]
    assert len(selected) == 6 and selected == sorted(selected)
    assert {8, 9, 10, 11} <= set(selected) and len(set(selected) & set(range(8))) == 2
    assert (tmp_path / "sample" / "sampled_sizes.png").is_file()

    def picks_from_a(**settings):
        sample(str(tmp_path / "clusters"), str(tmp_path / "sample"), target_size=6, **settings)
        return {paths.index(p) for p in read_lines(tmp_path / "sample" / "selected.txt")} & set(range(8))

    # seed= chooses which 2 of A's 8 (random); strategy=closest takes the 2 closest to A's centroid, at any seed
    assert len({tuple(sorted(picks_from_a(seed=s))) for s in range(4)}) > 1
    closest = levels[0].members()[levels[0].assignment[0]][:2].tolist()
    assert [picks_from_a(strategy="closest", seed=s) for s in range(2)] == [set(closest)] * 2


def test_cluster_a_deduplicated_subset_over_two_levels(pool, tmp_path):
    folder, _, _ = pool
    dedup(str(folder), str(tmp_path / "dedup"), threshold=0.95)
    kept = read_lines(tmp_path / "dedup" / "kept.txt")
    summary = cluster(
        str(folder), str(tmp_path / "clusters"), n_clusters=[4, 2], subset=str(tmp_path / "dedup" / "kept.txt")
    )
    levels, cluster_paths, _ = read_clusters(tmp_path / "clusters")
    assert cluster_paths == kept and len(kept) == 9
    assert [len(level.centroids) for level in levels] == [4, 2]
    assert [len(level.assignment) for level in levels] == [9, 4]
    assert summary["sample_size"] == [1, 1]  # half the average cluster size: 9 / 4 / 2 and 4 / 2 / 2
    assert (
        main(["curate", "sample", f"clusters={tmp_path / 'clusters'}", f"out={tmp_path / 's'}", "target_size=9"]) == 0
    )
    assert read_lines(tmp_path / "s" / "selected.txt") == kept


def test_retrieve_from_the_pool_clusters_of_the_seeds(concepts, embedded, tmp_path):
    folder, paths, _ = concepts
    cluster(str(folder), str(tmp_path / "clusters"), n_clusters=[3], n_resamples=0)
    rng = np.random.default_rng(5)
    seeds = unit(rng, 4)
    seeds[:] = [
        near(np.eye(DIM)[0], rng, 0.9),
        near(np.eye(DIM)[2], rng, 0.9),
        near(np.eye(DIM)[2], rng, 0.8),
        near(np.eye(DIM)[0], rng, 0.9),
    ]
    seeds_folder, _ = with_vectors(embedded / "emb_seeds", tmp_path / "seeds", seeds)

    retrieve(str(seeds_folder), str(tmp_path / "out"), clusters=str(tmp_path / "clusters"), per_seed=3)

    selected = {paths.index(p) for p in read_lines(tmp_path / "out" / "selected.txt")}
    # two seeds in A draw 6 of its 8 images; two in C ask 6 of its 2 and get both; B nothing
    assert len(selected & set(range(8))) == 6 and {10, 11} <= selected and not selected & {8, 9}
    record = json.loads((tmp_path / "out" / "retrieved.json").read_text())
    assert [len(r["hits"]) for r in record] == [6, 2, 0, 0]  # listed under the first seed of each cluster
    draws = set()  # seed= chooses which 6 of A's 8 images are drawn
    for seed in range(4):
        retrieve(str(seeds_folder), str(tmp_path / "out"), clusters=str(tmp_path / "clusters"), per_seed=3, seed=seed)
        draws.add(tuple(sorted(set(read_lines(tmp_path / "out" / "selected.txt")) - {paths[10], paths[11]})))
    assert len(draws) > 1 and all(len(d) == 6 for d in draws)


def test_curation_inputs_of_the_wrong_kind_are_clear_errors(pool, tmp_path):
    folder, _, _ = pool
    with pytest.raises(DinokitError, match="n_clusters\\[0\\] = 20: ask for at least 1 and at most 12"):
        cluster(str(folder), str(tmp_path / "c"), n_clusters=[20])
    dedup(str(folder), str(tmp_path / "dedup"))
    with pytest.raises(DinokitError, match="not the output of `dinokit curate cluster`"):
        sample(str(tmp_path / "dedup"), str(tmp_path / "s"), target_size=3)
    (tmp_path / "list.txt").write_text("/nowhere/a.png\n")
    with pytest.raises(DinokitError, match=r"1 of the 1 images listed in .* are not in the embedding"):
        cluster(str(folder), str(tmp_path / "c"), n_clusters=[2], subset=str(tmp_path / "list.txt"))


def test_cluster_on_the_command_line_takes_one_value_or_one_per_level(pool, tmp_path):
    folder, _, _ = pool
    out = str(tmp_path / "c")
    assert main(["curate", "cluster", f"features={folder}", f"out={out}", "n_clusters=[4,2]", "n_resamples=2"]) == 0
    assert main(["curate", "cluster", f"features={folder}", f"out={out}", "n_clusters=[4,2]", "sample_size=[2,1]"]) == 0
    meta = json.loads((tmp_path / "c" / "curation.json").read_text())
    assert meta["n_resamples"] == 10 and meta["sample_size"] == [2, 1]
    assert main(["curate", "cluster", f"features={folder}", f"out={out}", "n_clusters=[4,2]", "n_resamples=[1]"]) == 2


def test_cluster_passes_its_settings_to_the_clustering(pool, tmp_path, monkeypatch):
    import inspect

    import dinokit.curation.commands as commands

    calls = []
    original = commands.hierarchical_kmeans

    def spy(*args, **kwargs):
        calls.append(inspect.signature(original).bind(*args, **kwargs).arguments)
        return original(*args, **kwargs)

    monkeypatch.setattr(commands, "hierarchical_kmeans", spy)
    folder, _, _ = pool
    settings = ["n_clusters=[4,2]", "n_resamples=2", "sample_size=[3,1]", "strategy=random", "iterations=7", "seed=5"]
    assert main(["curate", "cluster", f"features={folder}", f"out={tmp_path / 'c'}", *settings]) == 0
    (given,) = calls
    expected = dict(n_resamples=2, sample_size=[3, 1], strategy="random", iterations=7, seed=5)
    assert list(given["n_clusters"]) == [4, 2] and {k: given[k] for k in expected} == expected


def test_feature_chooses_the_vectors_compared(embedded, tmp_path):
    """CLS vectors all unrelated, patch_mean vectors of images 1 and 2 copies of image 0's: only
    feature=patch_mean finds the copies."""
    rng = np.random.default_rng(7)
    cls, patch_mean = unit(rng, 12), unit(rng, 12)
    patch_mean[[1, 2]] = patch_mean[0]
    folder = tmp_path / "two"
    shutil.copytree(embedded / "emb_pool", folder)
    shard = folder / read_manifest(folder)["shards"][0]["file"]
    _, paths = read_shard(shard)
    kinds = {
        "cls": torch.from_numpy(cls.astype(np.float32)),
        "patch_mean": torch.from_numpy(patch_mean.astype(np.float32)),
    }
    write_shard(shard, kinds, paths, [], "float32")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["features"] = ["cls", "patch_mean"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert dedup(str(folder), str(tmp_path / "d"), feature="cls")["kept"] == 12
    assert dedup(str(folder), str(tmp_path / "d"), feature="patch_mean")["kept"] == 10


def test_cluster_with_no_levels_is_a_clear_error(pool, tmp_path, capsys):
    folder, _, _ = pool
    assert main(["curate", "cluster", f"features={folder}", f"out={tmp_path / 'c'}", "n_clusters=[]"]) == 2
    assert "n_clusters must list at least one level" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_out_may_not_be_a_folder_the_step_reads(concepts, tmp_path):
    folder, _, _ = concepts
    clusters = tmp_path / "clusters"
    cluster(str(folder), str(clusters), n_clusters=[3], n_resamples=0)
    before = sorted(p.name for p in clusters.iterdir())
    with pytest.raises(DinokitError, match=r"out=.* is the clusters= folder this step reads"):
        sample(str(clusters), str(clusters), target_size=4)
    with pytest.raises(DinokitError, match=r"out=.* is the clusters= folder this step reads"):
        retrieve(str(folder), str(clusters), clusters=str(clusters))
    assert sorted(p.name for p in clusters.iterdir()) == before and read_clusters(clusters)[2]["step"] == "cluster"
    dedup(str(folder), str(tmp_path / "dedup"))
    with pytest.raises(DinokitError, match="holds the subset= file this step reads"):
        cluster(str(folder), str(tmp_path / "dedup"), n_clusters=[2], subset=str(tmp_path / "dedup" / "kept.txt"))
    assert (tmp_path / "dedup" / "kept.txt").is_file()


def test_a_folder_of_another_kind_where_an_embedding_is_expected_says_what_it_is(pool, embedded, tmp_path):
    folder, _, _ = pool
    dedup(str(folder), str(tmp_path / "dedup"))
    build_index(str(folder), str(tmp_path / "index"))
    with pytest.raises(DinokitError, match=r"features=.*dedup is the output of `dinokit curate dedup`.*pass the"):
        cluster(str(tmp_path / "dedup"), str(tmp_path / "c"), n_clusters=[2])
    with pytest.raises(DinokitError, match=r"reference=.*index is an index folder .*pass the `dinokit embed` folder"):
        dedup(str(folder), str(tmp_path / "d2"), reference=str(tmp_path / "index"))
    with pytest.raises(DinokitError, match=r"seeds=.*nowhere: no such folder"):
        retrieve(str(tmp_path / "nowhere"), str(tmp_path / "r"), pool=str(folder))
    with pytest.raises(DinokitError, match=r"pool=.*kept.txt is a file, not a `dinokit embed` folder"):
        retrieve(str(embedded / "emb_seeds"), str(tmp_path / "r"), pool=str(tmp_path / "dedup" / "kept.txt"))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(folder, unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(DinokitError, match="run the same `dinokit embed` again to resume"):
        dedup(str(unfinished), str(tmp_path / "d3"))
    for name in ("c", "d2", "r", "d3"):
        assert not (tmp_path / name).exists()


def test_a_subset_that_is_missing_or_a_folder_is_a_clear_error(pool, tmp_path, capsys):
    folder, _, _ = pool
    dedup(str(folder), str(tmp_path / "dedup"))
    args = ["curate", "cluster", f"features={folder}", f"out={tmp_path / 'c'}", "n_clusters=[2]"]
    assert main([*args, f"subset={tmp_path / 'nolist.txt'}"]) == 2
    assert "subset=" in (err := capsys.readouterr().err) and "no such file" in err and "kept.txt" in err
    assert main([*args, f"subset={tmp_path / 'dedup'}"]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and f"subset={tmp_path / 'dedup' / 'kept.txt'}" in err and "written" not in err
    shard = next(folder.glob("*.safetensors"))
    assert main([*args, f"subset={shard}"]) == 2
    assert "is not a text file of image paths" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_min_score_no_cosine_reaches_is_refused(pool, embedded, tmp_path):
    folder, _, _ = pool
    with pytest.raises(DinokitError, match=r"min_score must be a cosine in \[-1, 1\]"):
        retrieve(str(embedded / "emb_seeds"), str(tmp_path / "r"), pool=str(folder), min_score=2)
    assert not (tmp_path / "r").exists()


def test_retrieve_from_a_deduplicated_pool_never_brings_back_a_removed_image(pool, embedded, tmp_path):
    folder, paths, x = pool
    rng = np.random.default_rng(6)
    seeds = unit(rng, 4)
    seeds[0] = near(x[6], rng, 0.95)  # nearest: 5 and its exact copy 6 (removed by dedup)
    seeds[1] = near(x[3], rng, 0.95)  # nearest: 3, a near-copy of 0 (removed)
    seeds_folder, _ = with_vectors(embedded / "emb_seeds", tmp_path / "seeds", seeds)
    dedup(str(folder), str(tmp_path / "dedup"), threshold=0.95)
    kept = read_lines(tmp_path / "dedup" / "kept.txt")
    subset = str(tmp_path / "dedup" / "kept.txt")

    summary = retrieve(str(seeds_folder), str(tmp_path / "out"), pool=str(folder), per_seed=2, subset=subset)

    selected = read_lines(tmp_path / "out" / "selected.txt")
    assert set(selected) <= set(kept) and paths[5] in selected and paths[0] in selected
    cosines = seeds @ x[[paths.index(p) for p in kept]].T
    truth = {kept[j] for j in np.argsort(-cosines, axis=1)[:, :2].ravel().tolist()}
    assert set(selected) == truth and summary["pool_images"] == len(kept) and summary["subset"] == subset
    with pytest.raises(DinokitError, match="subset= applies to pool="):
        retrieve(str(seeds_folder), str(tmp_path / "o2"), clusters=str(tmp_path / "dedup"), subset=subset)
    # an index folder (pools of millions) with subset= retrieves the same kept images
    build_index(str(folder), str(tmp_path / "index"))
    from_index = retrieve(
        str(seeds_folder), str(tmp_path / "o2"), pool=str(tmp_path / "index"), per_seed=2, subset=subset
    )
    assert read_lines(tmp_path / "o2" / "selected.txt") == selected and from_index["pool_images"] == len(kept)


def test_subset_is_read_like_any_image_list(pool, tmp_path):
    """Comments, relative paths (to the list's folder) and `path,label` lines, as `dinokit pretrain
    data=` and `dinokit embed data=` read a list, pick the same images."""
    folder, paths, _ = pool
    listing = Path(paths[0]).parent / "mine.txt"
    relative = Path(paths[2]).relative_to(listing.parent)
    listing.write_text(f"# my pick\n{paths[0]}\n{paths[1]},cat\n{relative}\n\n{paths[4]}\n")
    try:
        cluster(str(folder), str(tmp_path / "c"), n_clusters=[2], subset=str(listing))
    finally:
        listing.unlink()
    assert read_lines(tmp_path / "c" / "paths.txt") == [paths[i] for i in (0, 1, 2, 4)]
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    with pytest.raises(DinokitError, match="lists no images"):
        cluster(str(folder), str(tmp_path / "c2"), n_clusters=[2], subset=str(tmp_path / "empty.txt"))


def test_duplicates_png_shows_copies_of_the_reference_set_too(pool, embedded, tmp_path, monkeypatch):
    """Two duplicate groups and one reference copy with num_examples=2: the sheet has a row of each kind,
    however many duplicate groups there are."""
    folder, paths, x = pool
    seeds = unit(np.random.default_rng(2), 4)
    seeds[0] = x[9]
    reference, ref_paths = with_vectors(embedded / "emb_seeds", tmp_path / "ref", seeds)
    shown = {}
    monkeypatch.setattr(
        "dinokit.curation.commands.contact_sheet",
        lambda rows, path, first_labels: shown.update(rows=rows, labels=first_labels),
    )
    dedup(str(folder), str(tmp_path / "out"), reference=str(reference), num_examples=2)
    assert sorted(shown["labels"]) == ["kept", "reference"]
    assert (ref_paths[0], [(paths[9], pytest.approx(1.0, abs=1e-5))]) in shown["rows"]


def test_a_refused_embedding_says_which_settings_to_embed_with(pool, embedded, tmp_path):
    folder, _, _ = pool
    other = tmp_path / "seeds48"
    shutil.copytree(embedded / "emb_seeds", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["image_size"] = [48, 48]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DinokitError, match=r"image_size: \[48, 48\] in .*seeds48, \[32, 32\] in .*pool.*image_size=\[32,32\]"
    ):
        retrieve(str(other), str(tmp_path / "r"), pool=str(folder))


def test_a_negative_examples_is_refused(pool, embedded, tmp_path):
    folder, _, _ = pool
    with pytest.raises(DinokitError, match=r"num_examples must be 0 .* or more"):
        dedup(str(folder), str(tmp_path / "d"), num_examples=-1)
    with pytest.raises(DinokitError, match=r"num_examples must be 0 .* or more"):
        retrieve(str(embedded / "emb_seeds"), str(tmp_path / "r"), pool=str(folder), num_examples=-1)
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()


def test_similarity_png_of_a_single_image_draws_without_a_warning(tmp_path, recwarn):
    from dinokit.curation.commands import similarity_histogram

    similarity_histogram(np.array([np.nan], dtype=np.float32), 0.95, tmp_path / "s.png")
    assert (tmp_path / "s.png").is_file()
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_dedup_refuses_the_pool_itself_as_its_reference(pool, tmp_path):
    folder, _, _ = pool
    with pytest.raises(DinokitError, match="reference= is the features= embedding itself"):
        dedup(str(folder), str(tmp_path / "d"), reference=str(folder) + "/")
    assert not (tmp_path / "d").exists()


def test_similarity_png_legend_says_what_its_count_is(tmp_path, monkeypatch):
    """4 images in two pairs above the threshold: 4 images have a near-duplicate, 2 of them are removed."""
    from dinokit.curation.commands import similarity_histogram

    figures = []
    monkeypatch.setattr("dinokit.curation.commands.save_figure", lambda path, fig: figures.append(fig))
    similarity_histogram(np.array([0.99, 0.99, 0.97, 0.97, 0.5], dtype=np.float32), 0.95, tmp_path / "s.png")
    (legend,) = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend == "threshold 0.95: 4 images have a near-duplicate (one per group is kept)"


def test_a_damaged_clusters_folder_is_a_clear_error(concepts, tmp_path, capsys):
    folder, _, _ = concepts
    clusters = tmp_path / "clusters"
    cluster(str(folder), str(clusters), n_clusters=[3], n_resamples=0)
    data = (clusters / "clusters.safetensors").read_bytes()
    for damage in ("truncated", "missing", "no paths"):
        if damage == "truncated":
            (clusters / "clusters.safetensors").write_bytes(data[:100])
        elif damage == "missing":
            (clusters / "clusters.safetensors").unlink()
        else:
            (clusters / "clusters.safetensors").write_bytes(data)
            (clusters / "paths.txt").unlink()
        args = ["curate", "sample", f"clusters={clusters}", f"out={tmp_path / 's'}", "target_size=3"]
        assert main(args) == 2, damage
        err = capsys.readouterr().err
        assert "is missing or damaged" in err and "run `dinokit curate cluster" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_similarity_png_counts_the_images_deduplicate_calls_duplicates(tmp_path, monkeypatch):
    """At threshold 1.0, exact copies whose float32 cosine is 1 - 2e-6 are removed (TOLERANCE): the
    legend counts them too."""
    from dinokit.curation.commands import similarity_histogram

    figures = []
    monkeypatch.setattr("dinokit.curation.commands.save_figure", lambda path, fig: figures.append(fig))
    similarity_histogram(np.array([1 - 2e-6, 1 - 2e-6, 0.5], dtype=np.float32), 1.0, tmp_path / "s.png")
    (legend,) = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend.startswith("threshold 1.0: 2 images have a near-duplicate")


def test_an_embedding_made_with_the_same_weights_moved_elsewhere_is_accepted(pool, embedded, tmp_path):
    """The model's path may differ when both embeddings record the same weights hash; not the hash."""
    folder, _, _ = pool
    moved = tmp_path / "moved"
    shutil.copytree(embedded / "emb_seeds", moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    assert manifest["weights_hash"] and manifest["model"]
    manifest["model"] = "/elsewhere/m.safetensors"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    assert retrieve(str(moved), str(tmp_path / "r"), pool=str(folder), per_seed=1)["seed_images"] == 4
    manifest["weights_hash"] = "0" * len(manifest["weights_hash"])
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DinokitError, match=r"embedded differently \(model, weights_hash differ"):
        retrieve(str(moved), str(tmp_path / "r2"), pool=str(folder), per_seed=1)


def test_an_image_the_embedding_lists_twice_counts_once(embedded, tmp_path):
    """An embedding that lists an image twice (e.g. a data list naming it twice) gives it one row:
    not a near-duplicate of itself, and one line in kept.txt."""
    folder = tmp_path / "twice"
    shutil.copytree(embedded / "emb_pool", folder)
    shard = folder / read_manifest(folder)["shards"][0]["file"]
    _, paths = read_shard(shard)
    x = unit(np.random.default_rng(8), 12)
    write_shard(
        shard,
        {"cls": torch.from_numpy(np.concatenate([x, x[:1]]).astype(np.float32))},
        [*paths, paths[0]],
        [],
        "float32",
    )
    manifest = read_manifest(folder)
    manifest["shards"][0]["count"] = 13  # as embed counts the rows of the shard
    write_json(folder / "manifest.json", manifest)
    summary = dedup(str(folder), str(tmp_path / "d"))
    assert summary["images"] == 12 and summary["removed_duplicates"] == 0
    assert read_lines(tmp_path / "d" / "kept.txt") == paths
