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
from dinokit.features import embed as embed_module
from dinokit.features.embed import embed
from dinokit.features.store import read_embeddings, read_manifest

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


def embedded_names(out: Path) -> list[str]:
    return [Path(p).name for p in read_embeddings(out)[1]]


def shard_files(out: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.glob("shard_*"))}


def recording_reads(monkeypatch) -> list[str]:
    """The image paths the embed runs read from now on."""
    seen: list[str] = []
    real = embed_module.iter_features
    monkeypatch.setattr(
        embed_module, "iter_features", lambda m, paths, *a, **k: seen.extend(paths) or real(m, paths, *a, **k)
    )
    return seen


def test_embed_again_after_the_folder_gained_images_embeds_only_them(weights, photos, tmp_path, monkeypatch, capsys):
    """A data= that gained images was refused ('embed into a new out='): a growing photo collection was
    embedded anew each time. The listed images in no shard now go into new shards after the finished
    ones, which stay as they were (bytes, names); only the new images are read."""
    (photos / "05.bmp").write_bytes(b"not an image")  # a bad file of the first run
    out = tmp_path / "emb"
    run_embed(weights, photos, out)
    before = shard_files(out)
    for name, seed in (("02b.bmp", 12), ("06.bmp", 16), ("07.bmp", 17)):  # 02b sorts among the old images
        draw(photos / name, seed)
    (photos / "08.bmp").write_bytes(b"not an image either")
    seen = recording_reads(monkeypatch)
    summary = run_embed(weights, photos, out)
    new = [str(photos / name) for name in ("02b.bmp", "06.bmp", "07.bmp", "08.bmp")]
    assert seen == new
    assert (summary["shards"], summary["computed_shards"], summary["resumed_shards"]) == (5, 2, 3)
    assert "4 listed image(s) are in none of the 3 finished shard(s)" in capsys.readouterr().err
    assert {name: file for name, file in shard_files(out).items() if name in before} == before
    feats, paths = read_embeddings(out)
    assert paths == [str(photos / f"{i:02d}.bmp") for i in range(5)] + new[:3]  # old rows, then the new in order
    manifest = read_manifest(out)
    assert manifest["bad_files"] == [str(photos / "05.bmp"), new[3]]
    assert [s["file"] for s in manifest["shards"]] == [f"shard_0000{i}.safetensors" for i in range(5)]
    model, transform = dinokit.load_model(weights), dinokit.eval_transform(16)
    fresh = dinokit.extract_features(model, new[:3], transform, which=["cls"], precision="fp32")[0]
    assert torch.allclose(feats["cls"][5:], fresh["cls"], atol=1e-6)
    assert run_embed(weights, photos, out)["computed_shards"] == 0 and seen == new  # nothing new since


def test_embed_refuses_a_folder_that_lost_or_renamed_an_embedded_image(weights, photos, tmp_path):
    """An image of the shards that data= no longer lists cannot be dropped from them: refused, naming it
    and the fix, with nothing written."""
    out = tmp_path / "emb"
    run_embed(weights, photos, out)
    before = shard_files(out), (out / "embed_config.json").read_bytes()
    (photos / "02.bmp").rename(photos / "02-renamed.bmp")  # lost + gained
    lost = r"\(removed or renamed, first .*02\.bmp\).*Embed into a new out= folder"
    with pytest.raises(
        DinokitError, match=r"lists 6 images now, and 1 image\(s\) of the shards in .*emb are not among them " + lost
    ):
        run_embed(weights, photos, out)
    (photos / "02-renamed.bmp").unlink()
    with pytest.raises(DinokitError, match=r"lists 5 images now, .*" + lost):
        run_embed(weights, photos, out)
    assert (shard_files(out), (out / "embed_config.json").read_bytes()) == before


def test_a_killed_extension_resumes_and_takes_images_added_meanwhile(weights, photos, tmp_path, monkeypatch):
    """An extension killed in its new shards is finished by the same command (the shards written are
    kept); one killed before photos were added again takes them too: every image once, in shard order."""
    out = tmp_path / "emb"
    run_embed(weights, photos, out)
    real_write = embed_module.write_shard

    def killed_after_one_shard(written: list[str]):
        def write(path, *args):
            if written:  # the second new shard dies half-way through its write
                Path(path).with_name(f".{Path(path).name}.tmp99").write_bytes(b"half a shard")
                raise KeyboardInterrupt
            real_write(path, *args)
            written.append(Path(path).name)

        return write

    for i in range(6, 11):  # shards 3-5: [06, 07], [08, 09], [10]
        draw(photos / f"{i:02d}.bmp", i)
    monkeypatch.setattr(embed_module, "write_shard", killed_after_one_shard(written := []))
    with pytest.raises(KeyboardInterrupt):
        run_embed(weights, photos, out)
    assert written == ["shard_00003.safetensors"] and len(read_embeddings(out)[1]) == 6  # the manifest of then
    monkeypatch.setattr(embed_module, "write_shard", real_write)
    seen = recording_reads(monkeypatch)
    summary = run_embed(weights, photos, out)
    assert (summary["shards"], summary["computed_shards"]) == (6, 2) and [Path(p).name for p in seen] == [
        "08.bmp",
        "09.bmp",
        "10.bmp",
    ]
    assert embedded_names(out) == [f"{i:02d}.bmp" for i in range(11)]
    assert not list(out.glob(".*tmp*"))

    for i in range(11, 16):  # shards 6-8: [11, 12], [13, 14], [15]
        draw(photos / f"{i:02d}.bmp", i)
    monkeypatch.setattr(embed_module, "write_shard", killed_after_one_shard(written := []))
    with pytest.raises(KeyboardInterrupt):
        run_embed(weights, photos, out)
    monkeypatch.setattr(embed_module, "write_shard", real_write)
    draw(photos / "115.bmp", 115)  # added before the rerun, sorted between 11 and 12
    draw(photos / "16.bmp", 16)
    assert run_embed(weights, photos, out)["computed_shards"] == 3  # [115, 13], [14, 15], [16]
    names = [f"{i:02d}.bmp" for i in range(13)]
    assert embedded_names(out) == [*names, "115.bmp", "13.bmp", "14.bmp", "15.bmp", "16.bmp"]
    assert sorted(embedded_names(out)) == sorted(p.name for p in photos.iterdir())


def as_process(monkeypatch, rank: int, world: int) -> None:
    """embed runs as process `rank` of a torchrun job of `world` processes (each run alone, in turn)."""
    from dinokit import distributed

    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


def test_an_extension_under_two_processes_splits_the_new_shards_between_them(weights, photos, tmp_path, monkeypatch):
    """Under torchrun, process 0 records the extension's split before the others read it: each process
    computes the same shards and writes those i where i mod 2 is its rank; the manifest comes at the end."""
    out = tmp_path / "emb"
    run_embed(weights, photos, out)
    for i in range(6, 11):  # shards 3-5
        draw(photos / f"{i:02d}.bmp", i)
    as_process(monkeypatch, 0, 2)
    with pytest.raises(DinokitError, match=r"shard_00003\.safetensors is missing: a process did not finish"):
        run_embed(weights, photos, out)  # process 0: shard 4, then the manifest, which waits for 3 and 5
    assert sorted(p.name for p in out.glob("shard_*"))[3:] == ["shard_00004.safetensors"]
    as_process(monkeypatch, 1, 2)
    assert run_embed(weights, photos, out) is None  # process 1: shards 3 and 5
    as_process(monkeypatch, 0, 1)
    assert run_embed(weights, photos, out)["computed_shards"] == 0
    assert embedded_names(out) == [f"{i:02d}.bmp" for i in range(11)]


def test_an_extension_stopped_with_a_shard_missing_is_split_anew_from_there(
    weights, photos, tmp_path, monkeypatch, capsys
):
    """A torchrun extension stopped where process 1 had not written shard 3 but process 0 had written shard
    4, then photos added: the shards from the missing one on are split anew with them (shard 4 is
    computed again), every image once."""
    out = tmp_path / "emb"
    run_embed(weights, photos, out)
    for i in range(6, 11):
        draw(photos / f"{i:02d}.bmp", i)
    as_process(monkeypatch, 0, 2)
    with pytest.raises(DinokitError, match="a process did not finish"):
        run_embed(weights, photos, out)
    as_process(monkeypatch, 0, 1)
    draw(photos / "07b.bmp", 70)
    assert run_embed(weights, photos, out)["computed_shards"] == 3  # [06, 07], [07b, 08], [09, 10]
    assert "1 shard(s) after a missing one are computed again" in capsys.readouterr().err
    assert embedded_names(out) == [f"{i:02d}.bmp" for i in range(8)] + ["07b.bmp", "08.bmp", "09.bmp", "10.bmp"]


def test_an_index_built_before_an_extension_adds_just_the_new_images(weights, photos, tmp_path):
    """index build add=true from the extended embedding into the index of its first run: the new images
    are added, the others skipped, the embedding named once among the index's sources; every image is
    there once and finds itself first."""
    from dinokit.retrieval.commands import build_index
    from dinokit.retrieval.index import FeatureIndex
    from tests.conftest import perturb_scales_and_norms

    torch.manual_seed(0)  # a model whose vectors of noise images tell them apart (the module's: cosines ~1)
    model = perturb_scales_and_norms(dinokit.create_model("vit_micro_p4", depth=2))
    weights = str(dinokit.export_model(model, tmp_path / "distinct.safetensors"))
    out = tmp_path / "emb"
    run_embed(weights, photos, out)
    build_index(features=str(out), out=str(tmp_path / "index"))
    for name, seed in (("02b.bmp", 12), ("06.bmp", 16), ("07.bmp", 17)):
        draw(photos / name, seed)
    run_embed(weights, photos, out)
    summary = build_index(features=str(out), out=str(tmp_path / "index"), add=True)
    assert (summary["added"], summary["skipped"], summary["total"]) == (3, 6, 9)
    index = FeatureIndex.load(tmp_path / "index")
    feats, paths = read_embeddings(out)
    assert index.paths == paths and index.meta["sources"] == [str(out)]
    scores, ids = index.search(feats["cls"].numpy(), 2)
    assert [index.paths[i] for i in ids[:, 0]] == paths and (scores[:, 1] < scores[:, 0] - 1e-4).all()


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
    name (same size, later mtime) makes a new one, which extracts only that image."""
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
    capsys.readouterr()
    top1(tmp_path / "train", "knn4")
    assert len(list(cache.iterdir())) == len(entries) + 1
    assert "6 images, features reused 5, extracted 1" in capsys.readouterr().out  # the others' rows copied


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
