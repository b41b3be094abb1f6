import json
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.cli import main
from dinokit.errors import DinokitError
from dinokit.features.embed import embed
from dinokit.io import write_json
from dinokit.retrieval import index as index_module
from dinokit.retrieval.commands import build_index, search_index
from dinokit.retrieval.index import FeatureIndex
from tests.conftest import perturb_scales_and_norms, random_images

OPTIONS = dict(nlist=None, pq_m=8, pq_bits=8, hnsw_m=16)


@pytest.fixture(scope="module")
def clustered():
    """600 vectors around 12 centres, 40 queries, and the exact cosine top-10 of each query."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 32))
    labels = rng.integers(0, 12, 600)
    x = (centres[labels] + 0.3 * rng.normal(size=(600, 32))).astype(np.float32)
    query_labels = rng.integers(0, 12, 40)
    q = (centres[query_labels] + 0.3 * rng.normal(size=(40, 32))).astype(np.float32)
    xn, qn = x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    cosines = qn @ xn.T
    truth = np.argsort(-cosines, axis=1)[:, :10]
    return x, labels, q, query_labels, truth, np.take_along_axis(cosines, truth, axis=1)


def make(x, kind, **options):
    return FeatureIndex.create(x, [f"{i}.png" for i in range(len(x))], {}, kind=kind, **{**OPTIONS, **options})


def test_exact_indexes_equal_brute_force(clustered):
    x, _, q, _, truth, truth_scores = clustered
    for index, params in [(make(x, "flat"), {}), (make(x, "ivf", nlist=8), {"nprobe": 8})]:
        scores, ids = index.search(q, 10, **params)
        assert np.array_equal(ids, truth)
        assert np.allclose(scores, truth_scores, atol=1e-5)
        assert np.all(np.diff(scores, axis=1) <= 0)


def test_ivf_searches_sqrt_nlist_cells_by_default(clustered):
    """faiss's default of one cell returns fewer than k = 50 hits for some queries on these 600 vectors
    in 16 cells; the default ceil(sqrt(16)) = 4 cells gives what nprobe=4 gives, k hits for every query."""
    x, _, q, _, _, _ = clustered
    index = make(x, "ivf", nlist=16)
    default_scores, default_ids = index.search(q, 50)
    assert (default_ids >= 0).all()
    scores, ids = index.search(q, 50, nprobe=4)
    assert np.array_equal(default_ids, ids) and np.array_equal(default_scores, scores)
    assert (index.search(q, 50, nprobe=1)[1] < 0).any()  # one cell: fewer than k for some queries


def test_approximate_indexes_find_neighbours(clustered):
    x, labels, q, query_labels, truth, _ = clustered
    _, ids = make(x, "hnsw").search(q, 10, ef_search=200)
    assert np.mean([len(set(a) & set(b)) for a, b in zip(ids, truth, strict=True)]) >= 9.5
    for kind, opts in [("pq", {"pq_bits": 5}), ("ivfpq", {"nlist": 4, "pq_bits": 5})]:
        _, ids = make(x, kind, **opts).search(q, 10, nprobe=4)
        same_cluster = np.mean(labels[ids] == query_labels[:, None])  # chance level: 1/12
        assert same_cluster >= 0.95, kind


def test_training_needs_enough_vectors(clustered):
    x = clustered[0][:50]
    with pytest.raises(DinokitError, match="needs at least 256 vectors"):
        make(x, "pq")
    with pytest.raises(DinokitError, match="must divide"):
        make(x, "pq", pq_m=7)


def test_save_add_and_interrupted_add(clustered, tmp_path, monkeypatch):
    x = clustered[0]
    paths = [f"{i}.png" for i in range(len(x))]
    index = FeatureIndex.create(x[:400], paths[:400], {"feature": "cls"}, kind="flat", **OPTIONS)
    index.save(tmp_path / "i")
    loaded = FeatureIndex.load(tmp_path / "i")
    assert loaded.add(x[300:], paths[300:]) == 200  # 100 already indexed: skipped
    loaded.save(tmp_path / "i")
    files = ["index-1.faiss", "index.json", "paths-1.txt", "stamps-1.npy"]
    assert sorted(p.name for p in (tmp_path / "i").iterdir()) == files
    again = FeatureIndex.load(tmp_path / "i")
    assert again.paths == paths
    _, ids = again.search(x[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "write_json", crash)
    again.add(x[:1] + 1.0, ["new.png"])
    with pytest.raises(OSError):
        again.save(tmp_path / "i")
    monkeypatch.setattr(index_module, "write_json", write_json)
    assert FeatureIndex.load(tmp_path / "i").paths == paths  # the previous index is intact


def test_a_path_listed_twice_is_indexed_once(clustered):
    x = clustered[0][:6]
    index = FeatureIndex.create(x[:3], ["a", "b", "a"], {}, kind="flat", **OPTIONS)
    assert index.paths == ["a", "b"] and index.index.ntotal == 2
    _, ids = index.search(x[:1], 1)
    assert ids[0, 0] == 0  # the first vector of "a" was kept
    assert index.add(x[3:6], ["c", "a", "c"]) == 1  # "a" already indexed, "c" listed twice
    assert index.paths == ["a", "b", "c"] and index.index.ntotal == 3
    _, ids = index.search(x[3:4], 1)
    assert ids[0, 0] == 2


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """18 distinct images embedded in two runs with a tiny model (non-trivial weights)."""
    root = tmp_path_factory.mktemp("collection")
    rng = np.random.default_rng(1)
    for part, count in (("a", 12), ("b", 6)):
        random_images(root / part, count, 36, rng, prefix=part)
    torch.manual_seed(0)
    model = perturb_scales_and_norms(dinokit.create_model("vit_micro_p4", depth=2))
    weights = dinokit.export_model(model, root / "m.safetensors")
    for part in ("a", "b"):
        embed(weights, str(root / part), str(root / f"emb_{part}"), image_size=32, num_workers=0, progress=False)
    return root


def test_every_indexed_image_finds_itself_first(collection, tmp_path):
    build_index(str(collection / "emb_a"), str(tmp_path / "idx"))
    assert build_index(str(collection / "emb_b"), str(tmp_path / "idx"), add=True)["total"] == 18
    results = search_index(str(tmp_path / "idx"), [str(collection / "a"), str(collection / "b")], k=5, num_workers=0)
    assert len(results) == 18
    for r in results:
        assert r["hits"][0]["path"] == r["query"] and r["hits"][0]["score"] > 0.999
        assert len(r["hits"]) == 5 and r["hits"][1]["score"] < r["hits"][0]["score"]
    with pytest.raises(DinokitError, match="add=true"):
        build_index(str(collection / "emb_b"), str(tmp_path / "idx"))
    with pytest.raises(DinokitError, match="one vector per image"):
        build_index(str(collection / "emb_b"), str(tmp_path / "other"), feature="patch_tokens")


def test_add_keeps_the_index_structure_and_refuses_options_it_would_ignore(collection, tmp_path):
    build_index(str(collection / "emb_a"), str(tmp_path / "idx"), kind="hnsw", hnsw_m=8)
    for ignored, named in ((dict(kind="flat"), "kind=flat"), (dict(kind="hnsw", hnsw_m=16), "hnsw_m=16")):
        with pytest.raises(DinokitError, match=rf"is a hnsw index \(HNSW8\) and add=true .* so {named}"):
            build_index(str(collection / "emb_b"), str(tmp_path / "idx"), add=True, **ignored)
    assert build_index(str(collection / "emb_b"), str(tmp_path / "idx"), add=True, kind="hnsw")["total"] == 18
    index = FeatureIndex.load(tmp_path / "idx")
    assert (index.meta["kind"], index.meta["factory"], len(index.paths)) == ("hnsw", "HNSW8", 18)


def test_add_takes_the_options_the_index_was_built_with(collection, tmp_path):
    """The build command repeated with add=true (a script adding each new batch) gives the index's own
    options: they are not ignored (the add keeps them), so they are no reason to refuse it."""
    build_index(str(collection / "emb_a"), str(tmp_path / "idx"), kind="hnsw", hnsw_m=8)
    assert build_index(str(collection / "emb_b"), str(tmp_path / "idx"), add=True, kind="hnsw", hnsw_m=8)["total"] == 18
    with pytest.raises(DinokitError, match=r"\(HNSW8\) and add=true .* so nlist=4 would be ignored"):
        build_index(str(collection / "emb_b"), str(tmp_path / "idx"), add=True, kind="hnsw", hnsw_m=8, nlist=4)


def test_build_and_add_skip_images_an_embedding_lists_twice(collection, tmp_path):
    a, b = collection / "a", collection / "b"
    (tmp_path / "list.txt").write_text(f"{a / 'a0.png'}\n{b / 'b0.png'}\n{b / 'b0.png'}\n")
    embed_args = dict(image_size=32, num_workers=0, progress=False)
    embed(str(collection / "m.safetensors"), str(tmp_path / "list.txt"), str(tmp_path / "emb"), **embed_args)
    summary = build_index(str(tmp_path / "emb"), str(tmp_path / "new"))
    assert (summary["added"], summary["skipped"], summary["total"]) == (2, 1, 2)
    build_index(str(collection / "emb_a"), str(tmp_path / "idx"))
    summary = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), add=True)  # a0 indexed, b0 twice
    assert (summary["added"], summary["skipped"], summary["total"]) == (1, 2, 13)
    paths = FeatureIndex.load(tmp_path / "idx").paths
    assert len(paths) == len(set(paths)) == 13
    hits = search_index(str(tmp_path / "idx"), str(b / "b0.png"), k=2, num_workers=0)[0]["hits"]
    assert hits[0]["path"] == str(b / "b0.png") and hits[1]["path"] != hits[0]["path"]


def test_an_add_while_another_add_runs_waits_and_both_are_indexed(collection, tmp_path, monkeypatch):
    """Two `index build add=true` at once into one index both wrote its next generation: one add was
    lost (or its paths listed beside the other's vectors). The second now waits for the first."""
    b = collection / "b"
    (tmp_path / "list.txt").write_text(f"{b / 'b0.png'}\n")
    embed_args = dict(image_size=32, num_workers=0, progress=False)
    embed(str(collection / "m.safetensors"), str(tmp_path / "list.txt"), str(tmp_path / "emb"), **embed_args)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"))
    real_add = FeatureIndex.add_blocks  # build_index adds an embedding shard by shard
    other: list[threading.Thread] = []

    def add_while_another_adds(self, paths, blocks, stamps=None):
        added = real_add(self, paths, blocks, stamps)
        if not other:  # the first add starts the second and gives it time to finish before saving
            other.append(
                threading.Thread(
                    target=build_index, args=(str(b.parent / "emb_b"), str(tmp_path / "idx"), "cls", "flat", True)
                )
            )
            other[0].start()
            other[0].join(timeout=1.0)
        return added

    monkeypatch.setattr(FeatureIndex, "add_blocks", add_while_another_adds)
    build_index(str(collection / "emb_a"), str(tmp_path / "idx"), add=True)
    other[0].join()
    index = FeatureIndex.load(tmp_path / "idx")
    assert sorted(index.paths) == sorted(str(p) for part in "ab" for p in (collection / part).glob("*.png"))
    hits = search_index(index, [str(b / "b3.png"), str(collection / "a" / "a3.png")], k=1, num_workers=0)
    assert [r["hits"][0]["path"] for r in hits] == [r["query"] for r in hits]


def test_index_search_command_writes_the_json_and_a_contact_sheet(collection, tmp_path, capsys):
    assert main(["index", "build", f"features={collection / 'emb_a'}", f"out={tmp_path / 'idx'}"]) == 0
    query = collection / "a" / "a3.png"
    args = [f"index={tmp_path / 'idx'}", f"query={query}", "k=3", f"out={tmp_path / 'hits.json'}"]
    assert main(["index", "search", *args, f"sheet={tmp_path / 'sheet.png'}"]) == 0
    printed = capsys.readouterr().out
    assert "rank" in printed and "1.0000" in printed
    hits = json.loads((tmp_path / "hits.json").read_text())
    assert list(hits[0]) == ["query", "hits"] and hits[0]["query"] == str(query)
    assert [list(h) for h in hits[0]["hits"]] == [["path", "score"]] * 3
    assert hits[0]["hits"][0]["path"] == str(query)
    assert Image.open(tmp_path / "sheet.png").size == (4 * 132, 146)


def test_an_unreadable_query_image_is_an_error_naming_it_and_why(collection, tmp_path):
    build_index(str(collection / "emb_b"), str(tmp_path / "idx"))
    (tmp_path / "query.png").write_text("not an image")
    said = r"none of the 1 images of .*query\.png could be read; the first: .*query\.png: not an image format"
    with pytest.raises(DinokitError, match=said):
        search_index(str(tmp_path / "idx"), str(tmp_path / "query.png"), k=1, num_workers=0)


def test_k_below_one_is_a_clear_error(collection, tmp_path):
    build_index(str(collection / "emb_b"), str(tmp_path / "idx"))
    for k in (0, -1):  # was faiss' bare AssertionError
        with pytest.raises(DinokitError, match=f"k must be a positive number of hits, got {k}"):
            search_index(str(tmp_path / "idx"), str(collection / "b" / "b2.png"), k=k, num_workers=0)


def test_search_refuses_a_model_file_replaced_since_the_index_was_built(collection, tmp_path):
    torch.manual_seed(1)
    model = perturb_scales_and_norms(dinokit.create_model("vit_micro_p4", depth=2))
    original = dinokit.export_model(model, tmp_path / "original.safetensors")
    weights = dinokit.export_model(model, tmp_path / "m.safetensors")
    embed(weights, str(collection / "b"), str(tmp_path / "emb"), image_size=32, num_workers=0, progress=False)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"))
    query = str(collection / "b" / "b2.png")
    assert search_index(str(tmp_path / "idx"), query, k=1)[0]["hits"][0]["path"] == query  # unchanged: works

    with torch.no_grad():
        model.blocks[0].norm1.weight.add_(0.01)  # same architecture, other weights, at the same path
    dinokit.export_model(model, weights)
    with pytest.raises(DinokitError, match=r"changed since the index was built.*model=PATH"):
        search_index(str(tmp_path / "idx"), query, k=1)
    hits = search_index(str(tmp_path / "idx"), query, k=1, model=original)[0]["hits"]  # the original weights
    assert hits[0]["path"] == query and hits[0]["score"] > 0.999
    embed(weights, str(collection / "a"), str(tmp_path / "emb_new"), image_size=32, num_workers=0, progress=False)
    with pytest.raises(DinokitError, match="weights_hash differ"):
        build_index(str(tmp_path / "emb_new"), str(tmp_path / "idx"), add=True)


def test_search_after_the_models_file_moved_asks_for_model_where_it_is_now(collection, tmp_path):
    """The index records its model's path; once the file moved, search said `file not found ... check the
    spelling`, a path the user never typed, instead of pointing to model=."""
    weights = tmp_path / "m.safetensors"
    weights.write_bytes((collection / "m.safetensors").read_bytes())
    embed(str(weights), str(collection / "b"), str(tmp_path / "emb"), image_size=32, num_workers=0, progress=False)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"))
    moved = weights.rename(tmp_path / "moved.safetensors")
    query = str(collection / "b" / "b2.png")
    with pytest.raises(DinokitError, match=r"m\.safetensors.*is not there any more.*model="):
        search_index(str(tmp_path / "idx"), query, k=1)
    assert search_index(str(tmp_path / "idx"), query, k=1, model=str(moved))[0]["hits"][0]["path"] == query


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("hnsw", {"hnsw_m": 0}, "hnsw_m must be >= 2"),  # faiss aborted the process (HNSW1: a segfault)
        ("hnsw", {"hnsw_m": 1}, "hnsw_m must be >= 2"),
        ("pq", {"pq_m": 0}, "pq_m must be >= 1"),  # a ZeroDivisionError traceback
        ("pq", {"pq_bits": 0}, "pq_bits must be 1 to 16"),
        ("ivf", {"nlist": -4}, "nlist must be >= 1"),  # faiss could not parse 'IVF-4,Flat'
    ],
)
def test_index_options_out_of_range_are_a_clear_error(kind, options, message):
    with pytest.raises(DinokitError, match=message):
        index_module.factory_string(kind, 96, 1000, **{**OPTIONS, **options})


def test_an_embedding_without_the_feature_names_the_one_it_has(collection, tmp_path):
    """index build on an embedding of patch_mean only said "has no ['cls'] features", not what to pass."""
    embed_args = dict(image_size=32, num_workers=0, progress=False, features=["patch_mean"])
    embed(str(collection / "m.safetensors"), str(collection / "b"), str(tmp_path / "emb"), **embed_args)
    with pytest.raises(DinokitError, match=r"holds no cls vectors.*pass feature=patch_mean"):
        build_index(str(tmp_path / "emb"), str(tmp_path / "idx"))
    assert build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), feature="patch_mean")["total"] == 6


def test_a_damaged_index_file_is_an_error_naming_it_and_the_fix(collection, tmp_path):
    """index.json was read with json.loads: a damaged one ended in a bare JSONDecodeError traceback."""
    build_index(str(collection / "emb_a"), str(tmp_path / "idx"))
    meta = next(p for p in (tmp_path / "idx").iterdir() if p.suffix == ".json")
    meta.write_text(meta.read_text()[:10])
    with pytest.raises(DinokitError, match=r"is not valid JSON.*remove .* and build the index again"):
        search_index(str(tmp_path / "idx"), [str(collection / "a")], k=1, num_workers=0)


def test_the_fix_named_for_a_damaged_index_file_works(collection, tmp_path):
    """The damaged index.json's fix said `dinokit index build ... out=<the same folder>`, which build
    refuses there ('already holds an index'; add=true reads the damaged file again)."""
    idx = tmp_path / "idx"
    build_index(str(collection / "emb_a"), str(idx))
    (idx / "index.json").write_text((idx / "index.json").read_text()[:10])
    with pytest.raises(DinokitError, match=r"is not valid JSON") as error:
        search_index(str(idx), [str(collection / "a")], k=1, num_workers=0)
    assert f"remove {idx}" in str(error.value)
    shutil.rmtree(idx)  # the fix it names
    assert build_index(str(collection / "emb_a"), str(idx))["total"] > 0


def test_queries_are_decoded_as_the_indexed_images_were(collection, tmp_path, monkeypatch):
    """An index over an embedding made with reduced_decode=false (or before it existed) embeds its
    queries with whole decoding too, and one with the default with reduced decoding: exactly as the index."""
    from dinokit.retrieval import commands

    embed(
        str(collection / "m.safetensors"),
        str(collection / "b"),
        str(tmp_path / "whole"),
        image_size=32,
        num_workers=0,
        progress=False,
        reduced_decode=False,
    )
    build_index(str(tmp_path / "whole"), str(tmp_path / "idx_whole"))
    build_index(str(collection / "emb_b"), str(tmp_path / "idx_reduced"))
    seen = []
    extract = commands.extract_features
    monkeypatch.setattr(commands, "extract_features", lambda m, p, t, **kw: seen.append(t) or extract(m, p, t, **kw))
    for index in ("idx_whole", "idx_reduced"):
        hits = search_index(str(tmp_path / index), str(collection / "b" / "b1.png"), k=1, num_workers=0)
        assert hits[0]["hits"][0]["path"] == str(collection / "b" / "b1.png")
    assert [type(t.transforms[0]).__name__ == "ReducedJpegDecode" for t in seen] == [False, True]
    meta_file = tmp_path / "idx_whole" / "index.json"  # an embedding older than its transform record: None
    meta = json.loads(meta_file.read_text())
    meta["embedding"]["transform"] = None  # was a TypeError ('in' None)
    meta_file.write_text(json.dumps(meta))
    hits = search_index(str(tmp_path / "idx_whole"), str(collection / "b" / "b1.png"), k=1, num_workers=0)
    assert hits[0]["hits"][0]["path"] == str(collection / "b" / "b1.png")
    assert type(seen[-1].transforms[0]).__name__ != "ReducedJpegDecode"
