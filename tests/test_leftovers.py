"""Small defects found in reviews, each pinned by a test that failed before its fix."""

import importlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pretrain_helpers import TINY, tiny_images

import dinokit
from dinokit import cli
from dinokit.cli import parse_value
from dinokit.data.images import list_images, output_names
from dinokit.data.unlabelled import StreamBatchSampler
from dinokit.errors import DinokitError
from dinokit.eval.dense import read_depth
from dinokit.features.embed import embed
from dinokit.features.store import read_embeddings
from dinokit.maps.commands import read_mask, segment
from dinokit.maps.segment import patch_coverage, prototype
from dinokit.retrieval.commands import build_index
from dinokit.train.checkpoint import list_checkpoints
from dinokit.train.metrics_log import read_metrics


# ------------------------------------------------------------------ pretrain: a batch of bad files only
def test_an_empty_batch_still_saves_a_due_checkpoint_and_advances_the_bar(tmp_path, monkeypatch):
    """Iteration 2's batch (stream positions 8..15) is all unreadable files: no optimizer step, but the
    checkpoint due at iteration 2 is written and the bar moves 4 times in 4 iterations."""
    data = tiny_images(tmp_path / "data")
    paths = list_images(data)
    sampler = StreamBatchSampler(len(paths), TINY["batch_size"], seed=0)
    for position in range(8, 16):
        paths[sampler.index_at(position)].write_bytes(b"not an image")
    updates = []

    class Bar:  # records the progress bar's updates (the real one is disabled in tests)
        def __init__(self, **kwargs):
            self.n = kwargs.get("initial", 0)

        def update(self, n):
            updates.append(n)

        def set_postfix(self, *args, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(importlib.import_module("dinokit.train.pretrain"), "tqdm", Bar)
    out = tmp_path / "run"
    summary = dinokit.pretrain(
        data=str(data), out=str(out), **{**TINY, "max_iterations": 4, "checkpoint_every": 2, "keep_checkpoints": 0}
    )
    assert summary["bad_files"] == 8 and summary["iterations"] == 4
    names = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert names == ["checkpoint_00000002.pt", "checkpoint_00000004.pt"]
    assert sum(updates) == 4
    rows = read_metrics(out / "metrics.jsonl")
    # iteration 2's row: the window since the last row holds iteration 1's step (its losses, its speed)
    assert [r["iteration"] for r in rows] == [2, 4]
    assert rows[0]["bad_files"] == 8


# ------------------------------------------------------------------ depth targets: integer .npy
def test_an_integer_npy_depth_map_is_in_depth_scale_units_as_an_integer_png(tmp_path):
    """uint16 millimetres saved with np.save are divided by depth_scale, as the same values in a 16-bit
    PNG; float .npy stays metres."""
    millimetres = np.array([[1500, 0], [12250, 7]], dtype=np.uint16)
    np.save(tmp_path / "mm.npy", millimetres)
    Image.fromarray(millimetres).save(tmp_path / "mm.png")
    expected = np.array([[1.5, 0.0], [12.25, 0.007]], dtype=np.float32)
    assert np.array_equal(read_depth(tmp_path / "mm.npy", 1000.0), expected)
    assert np.array_equal(read_depth(tmp_path / "mm.png", 1000.0), expected)
    np.save(tmp_path / "cm.npy", np.array([[150, 3]], dtype=np.int32))
    assert np.array_equal(read_depth(tmp_path / "cm.npy", 100.0), np.array([[1.5, 0.03]], dtype=np.float32))
    np.save(tmp_path / "m.npy", expected.astype(np.float64))
    assert np.array_equal(read_depth(tmp_path / "m.npy", 1000.0), expected)  # float: metres, not scaled


# ------------------------------------------------------------------ CLI: list values holding commas
@pytest.mark.parametrize(
    "text, items",
    [
        ("['a,b.jpg', c.jpg]", ["a,b.jpg", "c.jpg"]),  # the YAML list form
        ('"a,b.jpg"', ["a,b.jpg"]),  # one quoted value is one item (was split, quotes kept: ['"a', 'b.jpg"'])
        ("'a,b.jpg'", ["a,b.jpg"]),
        ('"a,b.jpg", c.jpg', ["a,b.jpg", "c.jpg"]),  # CSV cells (was a YAML error)
        ("*.jpg,b.jpg", ["*.jpg", "b.jpg"]),  # not YAML (was 'while scanning an alias')
        ("a.jpg, b.jpg", ["a.jpg", "b.jpg"]),  # no leading space kept
        ("a.jpg", ["a.jpg"]),
    ],
)
def test_list_values_with_commas(text, items):
    assert parse_value(text, list[str]) == items
    assert parse_value(text, list[str] | None) == items


def test_a_broken_list_value_is_named_and_help_says_how_to_quote_commas(capsys):
    with pytest.raises(ValueError, match=r"not a YAML list .*\"\['a,b', c\]\""):
        parse_value("[a.jpg, b", list[str])
    with pytest.raises(ValueError, match=r"expected a number, got '@3'"):  # was YAML's scanner message
        parse_value("@3", int)
    assert cli.run(["embed", "--help"]) == 0
    assert "items holding commas are quoted in the list form: key=\"['a,b', c]\"" in capsys.readouterr().out


# ------------------------------------------------------------------ segment: VOC-style palette masks
def voc_mask(path, indices: np.ndarray) -> None:
    """A palette PNG as Pascal VOC saves its masks (no transparency): 0 black, 255 the void colour."""
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    palette = [0, 0, 0] * 256
    palette[15 * 3 : 15 * 3 + 3] = [192, 128, 128]  # VOC's person
    palette[7 * 3 : 7 * 3 + 3] = [128, 128, 128]
    palette[255 * 3 :] = [224, 224, 192]  # VOC's void
    im.putpalette(palette)
    im.save(path)


def test_a_voc_palette_mask_marks_its_classes_and_leaves_its_255_border_out(tmp_path):
    """8 x 8 pixels in 2 x 2 patches of 4 x 4: patch (0, 0) is class 15 with a 1 px void (255) border
    inside it, patch (0, 1) void only, patch (1, 0) class 7, patch (1, 1) background. The void patch is
    neither object (it was: 255 is nonzero) nor background evidence."""
    indices = np.zeros((8, 8), dtype=np.uint8)
    indices[:4, :4] = 255
    indices[1:3, 1:3] = 15
    indices[:4, 4:] = 255
    indices[4:, :4] = 7
    voc_mask(tmp_path / "voc.png", indices)
    mask = read_mask(tmp_path / "voc.png", (8, 8))
    assert np.array_equal(np.isnan(mask), indices == 255)
    assert np.array_equal(np.nan_to_num(mask), np.isin(indices, [7, 15]).astype(np.float32))
    features = np.eye(4, dtype=np.float32).reshape(2, 2, 4)  # one feature per patch
    assert np.array_equal(prototype(features, mask), (features[0, 0] + features[1, 0]) / 2)
    person = read_mask(tmp_path / "voc.png", (8, 8), reference_class=15)
    assert np.array_equal(np.nan_to_num(person), (indices == 15).astype(np.float32))
    assert np.array_equal(np.isnan(person), indices == 255)
    assert np.array_equal(patch_coverage(person, (2, 2)), [[1.0, 0.0], [0.0, 0.0]])  # 4 of 4 labelled pixels
    assert np.array_equal(prototype(features, person), features[0, 0])
    with pytest.raises(DinokitError, match=r"no pixel of class 3 \(it holds 0, 7, 15, 255\)"):
        read_mask(tmp_path / "voc.png", (8, 8), reference_class=3)
    voc_mask(tmp_path / "void_only.png", np.where(indices == 255, 255, 0))
    with pytest.raises(DinokitError, match=r"marks no object: it holds 0, 255.*reference_class=255"):
        read_mask(tmp_path / "void_only.png", (8, 8))
    Image.fromarray(np.where(indices == 255, 255, 0).astype(np.uint8)).save(tmp_path / "gray.png")
    assert np.array_equal(read_mask(tmp_path / "gray.png", (8, 8)), indices == 255)  # grayscale: 255 = object


def test_segment_takes_reference_class(tmp_path):
    weights = dinokit.export_model(dinokit.create_model("vit_micro_p4", depth=1), tmp_path / "m.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    indices = np.zeros((16, 16), dtype=np.uint8)
    indices[:8] = 15
    indices[8:, :8] = 255
    voc_mask(tmp_path / "ref_mask.png", indices)
    result = segment(
        str(tmp_path / "ref.png"),
        str(tmp_path / "ref_mask.png"),
        str(tmp_path / "ref.png"),
        out=str(tmp_path / "seg"),
        model=weights,
        image_size=16,
        device="cpu",
        reference_class=15,
    )
    assert len(result["results"]) == 1
    with pytest.raises(DinokitError, match="no pixel of class 4"):
        segment(
            str(tmp_path / "ref.png"),
            str(tmp_path / "ref_mask.png"),
            str(tmp_path / "ref.png"),
            out=str(tmp_path / "seg2"),
            model=weights,
            image_size=16,
            device="cpu",
            reference_class=4,
        )


# ------------------------------------------------------------------ input paths with `..`
def test_two_spellings_of_one_file_are_one_path_through_embed_and_index(tmp_path):
    """A list file naming imgs/y/a.png as ../imgs/y/a.png and ../imgs/x/../y/a.png, and imgs/y/b.png
    through a symlinked folder (link/../b.png: the system resolves link first): every path is read
    without its `folder/..` detour, so the embedding lists a.png twice under one name and the index
    keeps it once (it kept both spellings, as two images)."""
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "x").mkdir(parents=True)
    (tmp_path / "imgs" / "y" / "deep").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "y" / f"{name}.png")
    (tmp_path / "link").symlink_to(tmp_path / "imgs" / "y" / "deep")
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "l.txt"
    listing.write_text("../imgs/y/a.png\n../imgs/x/../y/a.png\n../link/../b.png\n")
    a, b = (tmp_path / "imgs" / "y" / "a.png"), (tmp_path / "imgs" / "y" / "b.png").resolve()
    assert list_images(listing) == [a, a, b]
    assert list_images(tmp_path / "imgs" / "x" / ".." / "y") == [a, tmp_path / "imgs" / "y" / "b.png"]
    assert output_names(list_images(listing), listing) == ["a", "a_png", "b"]  # never a `..` in an output name
    through_link = tmp_path / "link" / ".."  # the system's imgs/y (link's parent), not tmp_path
    assert list_images(through_link) == [a.resolve(), b]
    assert output_names(list_images(through_link), through_link) == ["a", "b"]

    weights = dinokit.export_model(dinokit.create_model("vit_micro_p4", depth=1), tmp_path / "m.safetensors")
    embed(model=weights, data=str(listing), out=str(tmp_path / "e"), image_size=16, num_workers=0, progress=False)
    paths = read_manifest_paths(tmp_path / "e")
    assert paths == [str(a), str(a), str(b)]
    summary = build_index(features=str(tmp_path / "e"), out=str(tmp_path / "index"))
    assert summary["total"] == 2 and summary["skipped"] == 1


def read_manifest_paths(folder: Path) -> list[str]:
    return read_embeddings(folder)[1]


def test_a_relative_data_path_leaves_no_detour_in_the_manifest_and_a_subset_finds_its_images(tmp_path, monkeypatch):
    """embed data=../imgs wrote /cwd/../imgs/a.png into its manifest, so a subset list naming the file
    by its plain absolute path found nothing; and a pretraining run started on imgs/x/../y could not
    resume once paths lost their detours (its data fingerprint changed)."""
    import numpy as np

    from dinokit.curation.commands import select_subset

    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "x").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{name}.png")
    monkeypatch.chdir(tmp_path / "work")
    weights = dinokit.export_model(dinokit.create_model("vit_micro_p4", depth=1), tmp_path / "m.safetensors")
    embed(model=weights, data="../imgs", out=str(tmp_path / "e"), image_size=16, num_workers=0, progress=False)
    features, paths = read_embeddings(tmp_path / "e")
    assert paths == [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "b.png")]
    listing = tmp_path / "subset.txt"
    listing.write_text(f"{tmp_path / 'imgs' / 'b.png'}\n")
    assert select_subset(features["cls"].numpy(), paths, str(listing), "e")[1] == [paths[1]]

    from dinokit.train.run_data import data_fingerprint

    detour = tmp_path / "imgs" / "x" / ".."
    assert data_fingerprint(list_images(detour), str(detour)) == data_fingerprint(
        list_images(tmp_path / "imgs"), str(tmp_path / "imgs")
    )


def test_the_random_init_note_is_printed_by_process_0_alone(monkeypatch, capsys):
    """Under torchrun (finetune model=random:...) every process printed the note."""
    from dinokit.eval.common import prepare_backbone

    monkeypatch.setenv("RANK", "1")
    prepare_backbone("random:vit_nano_p2", "cpu")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    prepare_backbone("random:vit_nano_p2", "cpu")
    assert "randomly initialised network" in capsys.readouterr().out


def test_a_size_far_above_the_models_own_grid_gets_a_note(capsys, tmp_path):
    """A cpu32 run (16 px crops) evaluated at the default image_size=224 was 30x slower and 6 points
    worse than at 32, silently: the commands that resize for a model now say so."""
    from dinokit.data.transforms import check_model_input_size

    model = dinokit.create_model("vit_nano_p2")  # img_size 16, patch 2: an 8 x 8 grid
    assert check_model_input_size(model, 32) == (32, 32) and capsys.readouterr().out == ""  # 4x: no note
    assert check_model_input_size(model, [64, 32]) == (64, 32)
    note = capsys.readouterr().out
    assert "image_size=[64, 32] makes a 32x16 patch grid, 8x the model's own 8x8 (img_size 16)" in note
    weights = dinokit.export_model(model, tmp_path / "nano.safetensors")
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    embed(model=weights, data=str(tmp_path / "a.png"), out=str(tmp_path / "e"), image_size=64, num_workers=0)
    assert "16x the model's own 8x8" in capsys.readouterr().out


def test_embed_is_one_run_per_folder_and_a_stop_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """Two embeds into one out= both computed every shard; Ctrl-C printed only 'interrupted'."""
    import dinokit.features.embed as embed_module
    from dinokit.io import folder_lock

    for i in range(3):
        Image.new("RGB", (16, 16), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    weights = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "nano.safetensors")
    run = dict(model=weights, data=str(tmp_path), out=str(tmp_path / "e"), image_size=16, num_workers=0, shard_size=1)
    refused = pytest.raises(DinokitError, match="another process is writing an embedding run")
    with folder_lock(tmp_path / "e", "an embedding run"), refused:  # another run holds the folder
        embed(**run)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_module, "run_shards", stopped)
    with pytest.raises(KeyboardInterrupt):
        embed(**run)
    assert "embed: stopped; 0 of 3 shards are saved" in capsys.readouterr().err
    monkeypatch.undo()
    assert embed(**run)["computed_shards"] == 3


def test_picture_outputs_must_be_named_png(tmp_path, capsys):
    """visualize attention out=a9.jpg wrote PNG bytes into a .jpg; out=a9 a PNG without a suffix."""
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    weights = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "nano.safetensors")
    common = [f"model={weights}", f"image={tmp_path / 'a.png'}", "image_size=16"]
    for out, hint in (("a9.jpg", "a9.png"), ("a9", "a9.png")):
        assert cli.main(["visualize", "attention", *common, f"out={tmp_path / out}"]) == 2
        err = capsys.readouterr().err
        assert "is written as PNG, so its name must end in .png" in err and str(tmp_path / hint) in err
        assert not (tmp_path / out).exists()
    assert cli.main(["visualize", "attention", *common, f"out={tmp_path / 'a9.png'}"]) == 0


def test_a_folder_for_one_image_and_an_image_for_a_labelled_set_are_named_as_such(tmp_path, capsys):
    """visualize similarity image=photos/ said 'Is a directory ... check that the file is a complete
    image'; eval knn train=photos/cat.jpg said it was 'neither an image nor a text list'."""
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "photos" / "cat.jpg")
    weights = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "nano.safetensors")
    args = [f"model={weights}", f"image={tmp_path / 'photos'}", "x=1", "y=1", f"out={tmp_path / 's.png'}"]
    assert cli.main(["visualize", "similarity", *args, "image_size=16"]) == 2
    err = capsys.readouterr().err
    assert "it is a folder. Pass one image file there (a file inside it, e.g." in err and "cat.jpg" in err
    cat = tmp_path / "photos" / "cat.jpg"
    args = ["model=random:vit_nano_p2", f"train={cat}", f"val={cat}", f"out={tmp_path / 'k'}", "image_size=16"]
    assert cli.main(["eval", "knn", *args]) == 2
    assert "is one image; a labelled dataset is a folder of <class>/<image files> folders" in capsys.readouterr().err


def test_a_command_refuses_another_commands_out_folder(tmp_path, capsys):
    """embed into a pretraining run, index build into its own features folder, eval knn into an
    embedding, pretrain into an eval folder: each succeeded and left the two commands' files mixed."""
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    weights = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "nano.safetensors")
    emb = tmp_path / "emb"
    embed(model=weights, data=str(tmp_path / "a.png"), out=str(emb), image_size=16, num_workers=0)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("objective: dinov2\n")
    (tmp_path / "knn").mkdir()
    (tmp_path / "knn" / "knn.json").write_text("{}")
    attempts = [
        (["embed", f"model={weights}", f"data={tmp_path / 'a.png'}", f"out={tmp_path / 'run'}"], "a training run"),
        (["index", "build", f"features={emb}", f"out={emb}"], "an embedding (dinokit embed)"),
        (["eval", "knn", f"model={weights}", f"train={tmp_path}", f"val={tmp_path}", f"out={emb}"], "an embedding"),
        (["pretrain", f"data={tmp_path / 'a.png'}", f"out={tmp_path / 'knn'}", "max_iterations=1"], "eval knn results"),
    ]
    for argv, holds in attempts:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"holds {holds}" in err and "choose another out folder" in err, (argv, err)
    assert sorted(p.name for p in (tmp_path / "knn").iterdir()) == ["knn.json"]  # nothing written there


def test_finetune_refuses_a_head_init_std_that_is_not_positive():
    from dinokit.train.finetune_config import resolve_config

    keys = {"model": "random:vit_nano_p2", "train": "t", "val": "v"}
    assert resolve_config({**keys, "head_init_std": 0.01}).head_init_std == 0.01
    with pytest.raises(DinokitError, match="head_init_std must be > 0"):
        resolve_config({**keys, "head_init_std": -1})
