"""Small defects found in reviews, each pinned by a test that failed before its fix."""

import importlib

import numpy as np
import pytest
from PIL import Image
from pretrain_helpers import TINY, tiny_images

import dinokit
from dinokit import cli
from dinokit.cli import parse_value
from dinokit.data.images import list_images
from dinokit.data.unlabelled import StreamBatchSampler
from dinokit.eval.dense import read_depth
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
