"""Review of the features, retrieval and maps area: each test pins a defect found and fixed."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.errors import DinokitError
from dinokit.features.embed import embed
from dinokit.features.store import read_embeddings
from dinokit.maps.commands import read_mask, segment, visualize_pca
from dinokit.maps.pca import pca_rgb
from dinokit.retrieval import index as index_module
from dinokit.retrieval.commands import build_index, search_index
from dinokit.retrieval.index import FeatureIndex
from tests.conftest import perturb_scales_and_norms, random_images


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """6 noise images and a tiny 2-block model (non-trivial weights) saved to a file."""
    root = tmp_path_factory.mktemp("review")
    random_images(root / "images", 6, 24, np.random.default_rng(0))
    torch.manual_seed(0)
    model = perturb_scales_and_norms(dinokit.create_model("vit_micro_p4", depth=2))
    weights = dinokit.export_model(model, root / "model.safetensors")
    return root, Path(weights), model.eval()


def run_embed(small, out: Path, **kw) -> dict:
    root, weights, _ = small
    args = dict(model=str(weights), data=str(root / "images"), image_size=16, num_workers=0, progress=False)
    return embed(out=str(out), **{**args, "precision": "fp32", **kw})


def test_embed_layers_out_of_range_are_refused_before_the_folder_is_started(small, tmp_path):
    # was: the error came from the first batch, after embed_config.json was written, so the corrected
    # command was then refused ("holds embeddings made with other settings (layers differ)")
    with pytest.raises(DinokitError, match=r"layers \[5\].*2 blocks.*-2 to 1"):
        run_embed(small, tmp_path / "e", features=["layers"], layers=[5])
    assert not (tmp_path / "e" / "embed_config.json").exists()
    assert run_embed(small, tmp_path / "e", features=["layers"], layers=[1])["embedded"] == 6


def test_index_add_takes_an_embedding_of_the_same_weights_at_another_path(small, tmp_path):
    # was: refused as "embedded differently (model differ)", though the weights hash is the same
    _, weights, _ = small
    moved = tmp_path / "moved.safetensors"
    shutil.copy(weights, moved)
    random_images(tmp_path / "more", 3, 24, np.random.default_rng(1), prefix="more")
    run_embed(small, tmp_path / "a")
    run_embed(small, tmp_path / "b", model=str(moved), data=str(tmp_path / "more"))
    build_index(str(tmp_path / "a"), str(tmp_path / "idx"))
    assert build_index(str(tmp_path / "b"), str(tmp_path / "idx"), add=True)["total"] == 9
    results = search_index(str(tmp_path / "idx"), str(tmp_path / "more"), k=1, num_workers=0)
    assert [r["hits"][0]["path"] for r in results] == [r["query"] for r in results]
    torch.manual_seed(1)  # not the set-up's seed: other weights whatever embed drew from the global stream
    other = perturb_scales_and_norms(dinokit.create_model("vit_micro_p4", depth=2))
    other_weights = dinokit.export_model(other, tmp_path / "other.safetensors")
    run_embed(small, tmp_path / "c", model=str(other_weights), data=str(tmp_path / "more"))
    with pytest.raises(DinokitError, match="weights_hash"):  # other weights are still refused
        build_index(str(tmp_path / "c"), str(tmp_path / "idx"), add=True)


def test_pca_of_fewer_than_three_patches_is_a_clear_error(small, tmp_path):
    # was: scikit-learn's ValueError traceback (n_components=3 must be between 0 and ... = 1)
    root, weights, _ = small
    with pytest.raises(DinokitError, match=r"3 patches.*image_size"):
        visualize_pca(str(root / "images" / "0.png"), str(tmp_path / "pca.png"), model=str(weights), image_size=4)
    with pytest.raises(DinokitError, match="3 patches"):
        pca_rgb([np.random.default_rng(0).normal(size=(1, 2, 8))], foreground_threshold=0.5)
    assert pca_rgb([np.random.default_rng(0).normal(size=(1, 3, 8))])["rgb"][0].shape == (1, 3, 3)


def test_embed_layers_without_a_per_block_feature_is_refused_not_ignored(small, tmp_path):
    # was: layers=[0, 1] with features=[cls] embedded the CLS alone, the layers silently ignored
    with pytest.raises(DinokitError, match=r"layers=\[0, 1\] is used by the features layers / layer_patch_tokens"):
        run_embed(small, tmp_path / "e", layers=[0, 1])
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("damage", ["truncate_index", "remove_index", "remove_paths"])
def test_a_damaged_or_missing_faiss_file_of_an_index_is_an_error_naming_it_and_the_fix(small, tmp_path, damage):
    # was: faiss's RuntimeError (or a FileNotFoundError) traceback
    run_embed(small, tmp_path / "e")
    idx = tmp_path / "idx"
    build_index(str(tmp_path / "e"), str(idx))
    faiss_file, paths_file = idx / "index-0.faiss", idx / "paths-0.txt"
    if damage == "truncate_index":
        faiss_file.write_bytes(faiss_file.read_bytes()[:20])
    else:
        (faiss_file if damage == "remove_index" else paths_file).unlink()
    with pytest.raises(DinokitError, match=r"index-0\.faiss|paths-0\.txt") as error:
        FeatureIndex.load(idx)
    assert f"remove {idx} and build the index again" in str(error.value)


@pytest.mark.parametrize("format", ["safetensors", "numpy"])
def test_a_shard_missing_from_a_finished_embedding_is_named_with_the_fix_that_works(small, tmp_path, format):
    # was: a FileNotFoundError (the CLI: one line without a fix) from read_embeddings, index build, eval, curate
    run_embed(small, tmp_path / "e", shard_size=2, format=format)
    next((tmp_path / "e").glob("shard_00001.*")).unlink()
    with pytest.raises(DinokitError, match=r"shard_00001\.\w+ is missing.*run the same `dinokit embed` again"):
        read_embeddings(tmp_path / "e")
    assert run_embed(small, tmp_path / "e", shard_size=2, format=format)["computed_shards"] == 1  # the fix
    assert len(read_embeddings(tmp_path / "e")[1]) == 6


def test_segment_and_pca_leave_out_their_own_earlier_outputs_inside_the_input_folder(small, tmp_path):
    # was: with out= inside target=, a second run segmented the first run's masks and overlays too (and
    # wrote seg/seg/...); visualize pca with out= inside image= took its earlier picture into the joint PCA
    root, weights, _ = small
    targets = tmp_path / "targets"
    shutil.copytree(root / "images", targets)
    ref, mask = root / "images" / "0.png", tmp_path / "mask.png"
    Image.fromarray(np.eye(24, dtype=np.uint8) * 255).save(mask)
    args = dict(out=str(targets / "seg"), model=str(weights), image_size=8, device="cpu")
    first = segment(str(ref), str(mask), str(targets), **args)
    second = segment(str(ref), str(mask), str(targets), **args)
    assert len(first["results"]) == len(second["results"]) == 6
    assert not (targets / "seg" / "seg").exists()
    photos = shutil.copytree(root / "images", tmp_path / "photos")
    pca_args = dict(model=str(weights), image_size=8, device="cpu")
    assert visualize_pca(str(photos), str(photos / "pca.png"), **pca_args)["images"] == 6
    assert visualize_pca(str(photos), str(photos / "pca.png"), **pca_args)["images"] == 6


def test_a_folder_of_photos_given_as_an_embedding_is_not_called_an_unfinished_run(small, tmp_path):
    # was: "manifest.json not found ... (the run has not finished: run the same `dinokit embed` again to
    # resume)" for a folder that no embed ever wrote to, e.g. features=photos/ in index build
    root, _, _ = small
    with pytest.raises(DinokitError, match=r"not a `dinokit embed` folder.*dinokit embed model=M data=\S*images") as e:
        build_index(str(root / "images"), str(tmp_path / "idx"))
    assert "has not finished" not in str(e.value)
    out = tmp_path / "e"
    run_embed(small, out)
    (out / "manifest.json").unlink()  # a run that stopped before its manifest still gets the resume hint
    with pytest.raises(DinokitError, match="the run has not finished"):
        read_embeddings(out)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_of_a_reference_mask_are_background_whatever_their_colour(tmp_path, mode):
    # was: the alpha channel was dropped, so a mask drawn on a transparent layer whose hidden colour is
    # white (as editors keep it) marked the whole image as the object
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere, visible only where opaque
    rgba[5:15, 10:20, 3] = 255
    Image.fromarray(rgba, mode="RGBA").convert(mode).save(tmp_path / "mask.png")
    mask = read_mask(tmp_path / "mask.png", (30, 20))
    truth = np.zeros((20, 30), dtype=bool)
    truth[5:15, 10:20] = True
    assert np.array_equal(mask, truth)
    opaque = rgba.copy()
    opaque[..., :3], opaque[..., 3] = 0, 255  # an opaque mask reads as before: nonzero pixels
    opaque[5:15, 10:20, :3] = 200
    Image.fromarray(opaque, mode="RGBA").convert(mode).save(tmp_path / "opaque.png")
    assert np.array_equal(read_mask(tmp_path / "opaque.png", (30, 20)), truth)


def test_transparent_pixels_of_a_palette_reference_mask_are_background(tmp_path):
    # a palette PNG keeps its transparency as a transparent palette entry (mode P, info['transparency']),
    # not as an alpha channel: its transparent pixels, here of palette index 1, marked the whole image
    indices = np.ones((20, 30), dtype=np.uint8)  # index 1: transparent (white, hidden)
    indices[5:15, 10:20] = 2  # index 2: the opaque object
    palette = Image.fromarray(indices, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * (3 * 253))
    palette.save(tmp_path / "mask.png", transparency=1)
    with Image.open(tmp_path / "mask.png") as saved:
        assert saved.mode == "P" and saved.info.get("transparency") is not None
    truth = np.zeros((20, 30), dtype=bool)
    truth[5:15, 10:20] = True
    assert np.array_equal(read_mask(tmp_path / "mask.png", (30, 20)), truth)
    palette.save(tmp_path / "opaque.png")  # without transparency: nonzero palette indices, as before
    assert read_mask(tmp_path / "opaque.png", (30, 20)).all()


def test_pca_foreground_of_fewer_than_three_patches_is_reported_as_it_is(tmp_path):
    # was: with fewer than 3 patches above the threshold every patch was returned (and drawn) as
    # foreground, the opposite of what the first component says
    rng = np.random.default_rng(0)
    feats = rng.normal(scale=0.1, size=(6, 6, 8))
    feats[3, 3, 0] = 50.0  # one outlier patch (a high-norm token) dominates the first component
    out = pca_rgb([feats], foreground_threshold=0.5)
    expected = np.zeros((6, 6), dtype=bool)
    expected[3, 3] = True
    assert np.array_equal(out["foreground"][0], expected)
    assert np.all(out["rgb"][0][~expected] == 0)


def test_pca_and_segment_on_unreadable_images_say_why(small, tmp_path):
    # was: "none of the 1 images can be read (first: ...bad.png)", without the reason the other commands give
    _, weights, _ = small
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(DinokitError, match=r"bad\.png: not an image format Pillow recognises"):
        visualize_pca(str(tmp_path / "bad.png"), str(tmp_path / "pca.png"), model=str(weights), image_size=8)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(tmp_path / "mask.png")
    with pytest.raises(DinokitError, match=r"bad\.png: not an image format Pillow recognises"):
        segment(
            str(tmp_path / "ref.png"),
            str(tmp_path / "mask.png"),
            str(tmp_path / "bad.png"),
            out=str(tmp_path / "seg"),
            model=str(weights),
            image_size=8,
        )


def test_a_search_that_loads_the_index_while_an_add_switches_generations_reads_the_new_one(
    small, tmp_path, monkeypatch
):
    # was: the add removed index-0.faiss between the search's reads of index.json and of that file, and the
    # search failed (faiss's RuntimeError; after the fix above, a message to rebuild a sound index)
    _, weights, _ = small
    run_embed(small, tmp_path / "a")
    random_images(tmp_path / "more", 2, 24, np.random.default_rng(2), prefix="more")
    run_args = dict(image_size=16, num_workers=0, progress=False, precision="fp32")
    embed(str(weights), str(tmp_path / "more"), str(tmp_path / "b"), **run_args)
    idx = tmp_path / "idx"
    build_index(str(tmp_path / "a"), str(idx))
    real_read = index_module.faiss.read_index
    added = []

    def read_after_an_add(path):
        if not added:  # another process's add completes right after this reader chose generation 0
            added.append(None)  # the add's own read is a plain one
            added[0] = build_index(str(tmp_path / "b"), str(idx), add=True)
        return real_read(path)

    monkeypatch.setattr(index_module.faiss, "read_index", read_after_an_add)
    index = FeatureIndex.load(idx)
    assert added[0]["total"] == 8 and len(index.paths) == index.index.ntotal == 8
