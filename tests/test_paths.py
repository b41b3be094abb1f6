"""Audit of awkward paths and file names: folders with spaces, accents, `=` and `,` in their names,
upper-case extensions, macOS and Windows junk, symlinked folders and link loops, file names that are
not UTF-8 (an old Latin-1 archive: `caf\\xe9.png`), through every command as the CLI runs it."""

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pretrain_helpers import TINY

import dinokit
from dinokit.cli import build_kwargs, main, parse_value
from dinokit.data.images import list_images, open_rgb, read_list_file
from dinokit.data.labelled import read_labelled
from dinokit.errors import DinokitError
from dinokit.eval.video import davis_sequence
from dinokit.features.store import read_embeddings

LATIN1 = b"caf\xe9.png"  # not UTF-8: Python lists it as 'caf\udce9.png' (surrogate escape)
RUN = ["device=cpu", "num_workers=0"]


def save(path: str | Path | bytes, seed: int) -> None:
    """A 16 px noise image (different for each seed, so that no two images are near-duplicates)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = os.fsdecode(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG" if path.lower().endswith(".png") else "JPEG", quality=95)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """(root, train, val, weights): `My Photos/été 2024/run=3/lr=1e-3,bs=64/{train,val}/{cat,dog}/` with
    upper-case extensions, a name starting with '-', one with a comma, one that is not UTF-8, macOS and
    Windows junk, a link loop, and a `bird` class linked in from elsewhere; a tiny model file (under a
    folder with `=` and a comma) whose random weights tell the images apart."""
    root = tmp_path_factory.mktemp("paths")
    base = root / "My Photos" / "été 2024" / "run=3" / "lr=1e-3,bs=64"
    seed = 0
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = base / split / cls
            for name in ("IMG_001.JPG", "b.Png", "-dash.jpeg", "comma,name.png"):
                save(folder / name, seed := seed + 1)
            save(os.path.join(os.fsencode(folder), LATIN1), seed := seed + 1)
            (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(64))
            (folder / "._IMG_001.JPG").write_bytes(b"\0\5\26\7" + bytes(64))  # AppleDouble resource file
            (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(64))
        (base / split / "cat" / "loop").symlink_to("..")  # a cycle
        for name in ("x.png", "y.png"):
            save(root / "elsewhere" / split / name, seed := seed + 1)
        (base / split / "bird").symlink_to(root / "elsewhere" / split)  # a class assembled from a link
    torch.manual_seed(0)
    net = dinokit.create_model("vit_micro_p4", depth=2)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)  # random init's CLS hardly depends on the image: every image a near-duplicate
    weights = dinokit.export_model(net, root / "weights=1, new" / "model.safetensors")
    return root, base / "train", base / "val", str(weights)


def latin1(paths) -> list[str]:
    """The paths among `paths` whose file name is the non-UTF-8 one."""
    return [str(p) for p in paths if os.fsencode(str(p)).endswith(b"/" + LATIN1)]


def test_every_image_of_an_awkward_tree_is_found_once_and_junk_is_no_image(tree):
    """Spaces, accents, `=` and `,` in folder names, upper-case extensions and a name that is not UTF-8
    are images; .DS_Store, ._* and Thumbs.db are not (not counted as bad files either); the linked
    class folder is followed and the loop walked once (os.walk(followlinks=True) with each real
    folder once: Path.rglob of Python 3.11 follows no link, that of 3.13 may be told to). A link out
    of the folder read is followed too: cat/loop leads to train/, whose dog/ then counts under cat/."""
    _, train, _, _ = tree
    paths = list_images(train)
    names = sorted(p.relative_to(train).as_posix() for p in paths)
    assert len(paths) == len(set(paths)) == 12 and len(latin1(paths)) == 2
    assert [n for n in names if "caf" not in n] == [
        "bird/x.png", "bird/y.png", "cat/-dash.jpeg", "cat/IMG_001.JPG", "cat/b.Png", "cat/comma,name.png",
        "dog/-dash.jpeg", "dog/IMG_001.JPG", "dog/b.Png", "dog/comma,name.png",
    ]  # fmt: skip
    assert read_labelled(train)[2] == ["bird", "cat", "dog"]  # `loop` is no class: it leads back to train/
    assert len(list_images(train / "cat")) == 12  # through cat/loop: every folder of train/, once


def test_a_value_holding_equals_signs_and_a_list_key_naming_a_path_with_a_comma(tree):
    """`data=/a/run=3` keeps everything after the first '='; a list key whose value is an existing
    path holding a comma (`reference_mask=.../lr=1e-3,bs=64/m.png`, segment) is that one path, as a
    list file's line is; it was cut at the comma into two paths, neither of them there."""
    _, train, _, _ = tree
    mask = train / "cat" / "comma,name.png"
    embed = dinokit.cli.resolve_command("embed")
    assert build_kwargs(embed, ["model=m", f"data={train}", "out=o"])["data"] == str(train)
    assert parse_value(str(mask), list[str]) == [str(mask)]
    assert parse_value("a.png,b.png", list[str]) == ["a.png", "b.png"]  # no such file: two items


def test_an_unquoted_path_with_a_space_is_named_with_the_quoting_that_fixes_it():
    """`dinokit embed data=My Photos/`: the shell splits the value at the space; the error said only
    'expected key=value, got Photos/'."""
    with pytest.raises(DinokitError, match=r"got 'Photos/'; .*quote the whole value: data=\"/x/My Photos/\""):
        build_kwargs(dinokit.cli.resolve_command("embed"), ["model=m", "data=/x/My", "Photos/", "out=o"])


def test_a_path_starting_or_ending_with_a_space_is_shown_so_when_not_found(tree):
    """`data="My Photos "` (pasted with a space): 'image source not found: .../My Photos (give ...' did
    not show the space that made the path wrong."""
    _, train, _, _ = tree
    with pytest.raises(DinokitError, match=r"not found: .* \(the path ends with a space: '.*/train '\)"):
        list_images(f"{train} ")
    with pytest.raises(DinokitError, match=r"not found: .* \(the path starts with a space: ' .*/train'\)"):
        read_labelled(f" {train}")
    with pytest.raises(DinokitError, match=r"no such file \(the path ends with a space: '.*/b.Png '\)"):
        open_rgb(f"{train / 'cat' / 'b.Png'} ")


def test_a_list_of_file_names_that_are_not_utf8_is_read_as_the_names(tree, tmp_path):
    """`ls > list.txt` of a Latin-1 archive holds the names' own bytes: the list was refused whole as
    'not a UTF-8 text list'; a binary file still is (test_images)."""
    _, train, _, _ = tree
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbf" + os.fsencode(train / "dog") + b"/" + LATIN1 + b"\r\n\r\n")
    assert latin1(list_images(tmp_path / "list.txt")) == latin1(list_images(train / "dog"))
    (tmp_path / "labels.csv").write_bytes(b"path,label\n" + os.fsencode(train / "dog") + b"/" + LATIN1 + b",dog\n")
    assert [(latin1([p]), label) for p, label in read_list_file(tmp_path / "labels.csv")] == [
        (latin1(list_images(train / "dog")), "dog")
    ]


def test_embed_index_curate_and_pretrain_round_trip_a_name_that_is_not_utf8(tree, tmp_path, monkeypatch):
    """embed -> index build -> index search (a terminal of a UTF-8 locale: strict stdout) -> curate
    dedup -> cluster -> sample -> pretrain data=<the sample's list>: the index's paths-*.txt and
    curation's lists were written with a strict encoding (UnicodeEncodeError after the work), the
    search table printed likewise, and pretrain hashed its file list so. Each list now holds the name's
    own bytes, which the next command reads back as the same file."""
    _, train, val, weights = tree
    out = tmp_path / "out dir" / "été=1"
    assert main(["embed", f"model={weights}", f"data={train}", f"out={out / 'emb'}", "image_size=16", *RUN]) == 0
    embedded = read_embeddings(out / "emb")[1]
    assert len(embedded) == 12 and len(latin1(embedded)) == 2
    assert main(["index", "build", f"features={out / 'emb'}", f"out={out / 'idx'}"]) == 0
    terminal = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", terminal)
    query = ["index", "search", f"index={out / 'idx'}", f"query={val / 'dog'}", "k=12", "device=cpu"]
    assert main([*query, f"out={out / 'hits.json'}"]) == 0
    assert b"/" + LATIN1 in terminal.buffer.getvalue()  # printed as its own bytes, as `ls` prints it
    monkeypatch.undo()
    hits = json.loads((out / "hits.json").read_text())
    assert len(latin1(h["path"] for h in hits[0]["hits"])) == 2 and len(latin1(h["query"] for h in hits)) == 1
    curate = ["curate", "dedup", f"features={out / 'emb'}", f"out={out / 'dedup'}", "threshold=0.9999", "device=cpu"]
    assert main(curate) == 0
    kept = (out / "dedup" / "kept.txt").read_bytes().splitlines()
    assert len(kept) == 12 and sum(line.endswith(b"/" + LATIN1) for line in kept) == 2
    cluster = ["curate", "cluster", f"features={out / 'emb'}", f"subset={out / 'dedup' / 'kept.txt'}"]
    assert main([*cluster, f"out={out / 'clusters'}", "n_clusters=[2]", "device=cpu"]) == 0
    assert json.loads((out / "clusters" / "curation.json").read_text())["images"] == 12  # every subset line found
    assert main(["curate", "sample", f"clusters={out / 'clusters'}", f"out={out / 'sample'}", "target_size=12"]) == 0
    pretrain = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY.items()]
    listed = out / "sample" / "selected.txt"
    assert len(list_images(listed)) == 12 and len(latin1(list_images(listed))) == 2
    broken = os.path.join(os.fsencode(tmp_path), b"broken_" + LATIN1)
    Path(os.fsdecode(broken)).write_bytes(b"not an image")
    (tmp_path / "data.txt").write_bytes(listed.read_bytes() + broken + b"\n")
    assert main(["pretrain", f"data={tmp_path / 'data.txt'}", f"out={out / 'run'}", *pretrain, "max_iterations=2"]) == 0
    assert (out / "run" / "bad_files.txt").read_bytes() == broken + b"\n"  # named as it is on disk


def test_eval_predict_and_pictures_take_a_name_that_is_not_utf8(tree, tmp_path, monkeypatch):
    """eval knn / linear hashed the file list for the feature cache with a strict encoding (a crash
    before any work, with cache=none too); predict classification's CSV was written so (a crash after
    the work), and with images= relative its paths were relative to the folder predict ran in, which
    the CSV read back as a list (train=, data=: relative to the CSV's folder) did not find; visualize
    pca titled the picture with the name, which matplotlib refuses."""
    _, train, val, weights = tree
    out = tmp_path / "out dir" / "été=1"
    common = [f"model={weights}", f"train={train}", f"val={val}", "image_size=16", "cache=none", *RUN]
    assert main(["eval", "knn", *common, f"out={out / 'knn'}", "ks=[3]"]) == 0
    assert json.loads((out / "knn" / "knn.json").read_text())["protocol"]["val_images"] == 12
    linear = ["epochs=1", "learning_rates=[0.01]", "n_last_blocks=[1]", "avgpool=[false]"]
    assert main(["eval", "linear", *common, f"out={out / 'linear'}", *linear]) == 0
    monkeypatch.chdir(val.parent)
    predict = ["predict", "classification", f"head={out / 'linear'}", "images=val", "device=cpu"]
    assert main([*predict, f"out={out / 'predictions.csv'}", "num_workers=0"]) == 0
    rows = (out / "predictions.csv").read_bytes().splitlines()
    assert len(rows) == 13 and sum(b"/" + LATIN1 + b'",' in row for row in rows) == 2
    listed = read_list_file(out / "predictions.csv")  # as train= or data= read it: path, class
    assert len(listed) == 12 and all(path.is_file() and label for path, label in listed)
    pca = ["visualize", "pca", f"model={weights}", f"image={val / 'dog'}", f"out={out / 'pca.png'}"]
    assert main([*pca, "image_size=16", "device=cpu"]) == 0 and (out / "pca.png").is_file()


def test_a_davis_folder_copied_from_a_mac_has_no_appledouble_frames(tmp_path):
    """eval video listed a sequence's frames with glob('*.jpg'): a macOS copy's ._00000.jpg became the
    first frame, whose annotation ._00000.png 'is missing'. Frames are found as every image folder is."""
    frames, annotations = tmp_path / "JPEGImages" / "480p" / "bear", tmp_path / "Annotations" / "480p" / "bear"
    annotations.mkdir(parents=True)
    for t in range(3):
        save(frames / f"{t:05d}.jpg", t)
        Image.new("P", (16, 16)).save(annotations / f"{t:05d}.png")
    (frames / "._00000.jpg").write_bytes(b"\0\5\26\7" + bytes(64))
    assert [f.name for f in davis_sequence(tmp_path, "bear", "480p").frames] == ["00000.jpg", "00001.jpg", "00002.jpg"]
