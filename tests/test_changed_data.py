"""The user's data changes between two runs (images added, removed, replaced under their name, labels
edited, the same folder reached through a symlink): a resumed or cached job never mixes stale and fresh
results. It computes again what changed, or refuses with one line naming the change and the fix."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.errors import DinokitError
from dinokit.features.embed import embed
from dinokit.features.store import read_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")


def draw(path: Path, seed: int, size: int = 20) -> None:
    """A tiny image of seeded noise; BMP, so that every image of one size has the same file size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def replace(path: Path, seed: int) -> None:
    """Another picture under the same name and of the same size, written a second later (an export)."""
    before = path.stat()
    draw(path, seed)
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = dinokit.create_model("vit_micro_p4", depth=1)
    return str(dinokit.export_model(model, tmp_path_factory.mktemp("model") / "model.safetensors"))


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    for i in range(6):
        draw(folder / f"{i:02d}.bmp", i)
    return folder


def run_embed(weights: str, data, out, **kw) -> dict:
    args = dict(image_size=16, batch_size=2, num_workers=0, shard_size=2, progress=False, precision="fp32")
    return embed(model=weights, data=str(data), out=str(out), **{**args, **kw})


# ------------------------------------------------------------------------------------------ embed
def test_embed_again_computes_the_shard_of_a_file_replaced_under_its_name(weights, photos, tmp_path, capsys):
    """Every finished shard was kept as it was: a photo exported again under its name (same size) kept its
    old features for good. Shards now record their files' size and mtime and are computed again where
    a file changed."""
    run_embed(weights, photos, tmp_path / "emb")
    replace(photos / "03.bmp", 99)
    summary = run_embed(weights, photos, tmp_path / "emb")
    assert summary["computed_shards"] == 1 and summary["resumed_shards"] == 2
    assert "1 file(s) changed since they were embedded (first: " in capsys.readouterr().err
    feats, paths = read_embeddings(tmp_path / "emb")
    model = dinokit.load_model(weights)
    transform = dinokit.eval_transform(16)
    fresh = dinokit.extract_features(model, [photos / "03.bmp"], transform, which=["cls"], precision="fp32")[0]
    assert paths[3].endswith("03.bmp") and torch.allclose(feats["cls"][3], fresh["cls"][0], atol=1e-6)
    assert run_embed(weights, photos, tmp_path / "emb")["computed_shards"] == 0  # nothing changed since


def test_embed_again_embeds_an_unreadable_image_once_it_was_exported_again(weights, photos, tmp_path):
    """A file skipped as unreadable stayed in the manifest's bad files after it was replaced by a good
    image: its shard was finished. Its stamp is recorded too, so the shard is computed again."""
    (photos / "02.bmp").write_bytes(b"not an image")
    assert run_embed(weights, photos, tmp_path / "emb")["bad_files"] == 1
    draw(photos / "02.bmp", 2)
    summary = run_embed(weights, photos, tmp_path / "emb")
    assert (summary["bad_files"], summary["embedded"], summary["computed_shards"]) == (0, 6, 1)


def test_embed_into_a_run_whose_folder_gained_or_lost_images_names_them(weights, photos, tmp_path):
    """The refusal said 'num_images, paths_sha1 differ'; it now says what changed and what to do."""
    run_embed(weights, photos, tmp_path / "emb")
    draw(photos / "06.bmp", 6)
    with pytest.raises(DinokitError, match=r"lists 7 images now, 6 when .* was started \(1 added, first .*06\.bmp\)"):
        run_embed(weights, photos, tmp_path / "emb")
    (photos / "06.bmp").unlink()
    (photos / "02.bmp").unlink()
    with pytest.raises(DinokitError, match=r"\(1 removed, first .*02\.bmp\).*Embed into a new out= folder"):
        run_embed(weights, photos, tmp_path / "emb")


def test_embed_resumes_a_run_through_a_symlink_or_a_relative_path_to_its_folder(weights, photos, tmp_path, monkeypatch):
    """The same folder through a symlink was refused ('data, paths_sha1 differ'); it now resumes, with
    the paths spelled as the run began."""
    first = run_embed(weights, photos, tmp_path / "emb")
    (tmp_path / "link").symlink_to(photos)
    assert run_embed(weights, tmp_path / "link", tmp_path / "emb")["computed_shards"] == 0
    monkeypatch.chdir(tmp_path)
    assert run_embed(weights, "photos", tmp_path / "emb")["computed_shards"] == 0
    assert read_embeddings(tmp_path / "emb")[1] == [str(p) for p in sorted(photos.iterdir())]
    assert first["embedded"] == 6


# ------------------------------------------------------------------------------------------ index build
def test_index_add_skips_images_indexed_under_another_spelling_of_their_folder(weights, photos, tmp_path):
    """An embedding of the same folder through a symlink was added again in full: every image twice in
    the index (each query hit both copies). Images are now matched with their folder's symlinks resolved;
    a folder that gained an image adds just that one."""
    from dinokit.retrieval.commands import build_index
    from dinokit.retrieval.index import FeatureIndex

    run_embed(weights, photos, tmp_path / "emb")
    build_index(features=str(tmp_path / "emb"), out=str(tmp_path / "index"))
    (tmp_path / "link").symlink_to(photos)
    draw(photos / "06.bmp", 6)
    run_embed(weights, tmp_path / "link", tmp_path / "emb_link")
    summary = build_index(features=str(tmp_path / "emb_link"), out=str(tmp_path / "index"), add=True)
    assert (summary["added"], summary["skipped"], summary["total"]) == (1, 6, 7)
    assert FeatureIndex.load(tmp_path / "index").paths[-1] == str(tmp_path / "link" / "06.bmp")


def test_index_add_refuses_an_image_replaced_since_it_was_indexed(weights, photos, tmp_path):
    """add=true skipped images indexed already, so one replaced under its name and embedded again kept
    its old vector. The index now records each image's size and mtime when embedded and refuses."""
    from dinokit.retrieval.commands import build_index

    run_embed(weights, photos, tmp_path / "emb")
    build_index(features=str(tmp_path / "emb"), out=str(tmp_path / "index"))
    replace(photos / "04.bmp", 44)
    run_embed(weights, photos, tmp_path / "emb")  # embed again: the shard of 04.bmp is computed again
    with pytest.raises(DinokitError, match=r"1 image\(s\) of .* changed since they were indexed .*04\.bmp"):
        build_index(features=str(tmp_path / "emb"), out=str(tmp_path / "index"), add=True)
    assert build_index(features=str(tmp_path / "emb"), out=str(tmp_path / "fresh"))["total"] == 6


def test_a_damaged_stamps_file_of_an_index_is_an_error_naming_it(weights, photos, tmp_path):
    from dinokit.retrieval.commands import build_index
    from dinokit.retrieval.index import FeatureIndex

    run_embed(weights, photos, tmp_path / "emb")
    build_index(features=str(tmp_path / "emb"), out=str(tmp_path / "index"))
    stamps = tmp_path / "index" / "stamps-0.npy"
    stamps.write_bytes(stamps.read_bytes()[:60])
    with pytest.raises(DinokitError, match=r"stamps-0\.npy is damaged.*build the index again"):
        FeatureIndex.load(tmp_path / "index")


# ------------------------------------------------------------------------------------------ eval video
def test_eval_video_tracks_again_a_finished_sequence_whose_annotations_were_corrected(tmp_path, monkeypatch):
    """A rerun kept every finished sequence's scores.json, so scores of annotations corrected since stayed
    in video.json. A sequence whose frames or annotations changed is now tracked again; the same DAVIS
    folder through a symlink keeps its finished sequences."""
    from test_eval_video import make_sequence, palette_png

    from dinokit.cli import main
    from dinokit.eval import video as video_module

    root = tmp_path / "DAVIS"
    make_sequence(root, "alpha", 4, 1, seed=1)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("alpha\n")
    torch.manual_seed(0)
    model = dinokit.create_model("vit_micro_p4", depth=1)
    with torch.no_grad():
        model.pos_embed.zero_()  # frames rolled by whole patches are tracked exactly (see test_eval_video)
    weights = dinokit.export_model(model, tmp_path / "m.safetensors")
    args = [f"model={weights}", f"out={tmp_path / 'out'}", "image_size=128", "size_mask_neighborhood=3"]
    args += ["device=cpu", "num_workers=0"]
    tracked = []
    real = video_module.track_sequence
    monkeypatch.setattr(video_module, "track_sequence", lambda net, v, *rest: tracked.append(v) or real(net, v, *rest))
    assert main(["eval", "video", *args, f"data={root}"]) == 0
    assert dinokit.io.read_json(tmp_path / "out" / "alpha" / "scores.json")["J_mean"] == 1
    (tmp_path / "link").symlink_to(root)
    assert main(["eval", "video", *args, f"data={tmp_path / 'link'}"]) == 0 and len(tracked) == 1
    annotation = root / "Annotations" / "480p" / "alpha" / "00001.png"
    palette_png(np.zeros((128, 128), dtype=np.uint8), annotation)  # the object is not in frame 1 after all
    assert main(["eval", "video", *args, f"data={root}"]) == 0 and len(tracked) == 2
    scores = (tmp_path / "out" / "video.json").read_text()
    assert '"frames_scored": 2' in scores and "files_sha256" not in scores
    assert dinokit.io.read_json(tmp_path / "out" / "alpha" / "scores.json")["J_mean"] == 0.5


# ------------------------------------------------------------------------------------------ readers of an embedding
def test_curate_and_index_build_refuse_an_embedding_of_images_replaced_since(weights, photos, tmp_path):
    """curate and index build read an embedding's vectors as they were: after a photo was replaced under
    its name, dedup against a fresh reference embedding mixed old and new images. Both now refuse,
    naming the image and the fix (embed again: only its shard is computed); a missing image (the
    embedding read on another machine) is not a change."""
    from dinokit.curation.commands import dedup
    from dinokit.retrieval.commands import build_index

    run_embed(weights, photos, tmp_path / "emb")
    replace(photos / "05.bmp", 55)
    refusal = r"1 image\(s\) of .*emb changed since they were embedded \(first: .*05\.bmp\).*dinokit embed` again"
    with pytest.raises(DinokitError, match=refusal):
        dedup(features=str(tmp_path / "emb"), out=str(tmp_path / "dedup"))
    with pytest.raises(DinokitError, match=refusal):
        build_index(features=str(tmp_path / "emb"), out=str(tmp_path / "index"))
    assert run_embed(weights, photos, tmp_path / "emb")["computed_shards"] == 1
    (photos / "00.bmp").unlink()
    assert build_index(features=str(tmp_path / "emb"), out=str(tmp_path / "index"))["total"] == 6


# ------------------------------------------------------------------------------------------ eval cache
def test_eval_knn_takes_edited_labels_and_another_spelling_from_the_cache_and_a_replaced_image_anew(
    weights, tmp_path, capsys
):
    """Features do not depend on labels: a path,label CSV edited (labels fixed) reuses the cached entry
    with the new labels; the same folder through a symlink is the same entry; an image replaced under its
    name (same size, later mtime) makes a new one."""
    from dinokit.cli import main

    for c, cls in enumerate("ab"):
        for i in range(3):
            draw(tmp_path / "train" / cls / f"{i}.bmp", 10 * c + i)
        draw(tmp_path / "val" / cls / "0.bmp", 10 * c + 5)
    rows = [f"{p},{p.parent.name}" for p in sorted((tmp_path / "train").rglob("*.bmp"))]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    cache = tmp_path / "cache"
    knn = ["eval", "knn", f"model={weights}", "image_size=16", "num_workers=0", f"cache={cache}", "ks=[1]"]
    knn += [f"val={tmp_path / 'val'}", "precision=fp32"]

    def top1(train: str, out: str) -> float:
        assert main([*knn, f"train={train}", f"out={tmp_path / out}"]) == 0
        return dinokit.io.read_json(tmp_path / out / "knn.json")["top1"]["1"]

    before = top1(tmp_path / "train.csv", "knn1")
    entries = sorted(p.name for p in cache.iterdir())
    (tmp_path / "train.csv").write_text("\n".join(r[:-1] + ("b" if r.endswith("a") else "a") for r in rows) + "\n")
    assert top1(tmp_path / "train.csv", "knn2") == 100 - before  # every label swapped: every vote too
    (tmp_path / "link").symlink_to(tmp_path / "train")
    top1(tmp_path / "link", "knn3")
    assert sorted(p.name for p in cache.iterdir()) == entries
    replace(tmp_path / "train" / "a" / "0.bmp", 77)
    top1(tmp_path / "train", "knn4")
    assert len(list(cache.iterdir())) == len(entries) + 1


def test_curate_retrieve_refuses_a_pool_index_of_images_replaced_since(weights, photos, tmp_path):
    """pool= an index folder: its vectors stay those of the images when they were embedded; after one was
    replaced, seeds embedded since were matched against its old vector. Refused now, with the fix."""
    from dinokit.curation.commands import retrieve
    from dinokit.retrieval.commands import build_index

    run_embed(weights, photos, tmp_path / "emb")
    build_index(features=str(tmp_path / "emb"), out=str(tmp_path / "index"))
    replace(photos / "01.bmp", 11)
    run_embed(weights, photos, tmp_path / "emb")  # the seeds, fresh
    with pytest.raises(DinokitError, match=r"1 image\(s\) of .*index changed .*01\.bmp.*build the index anew"):
        retrieve(seeds=str(tmp_path / "emb"), pool=str(tmp_path / "index"), out=str(tmp_path / "retrieved"))
