"""Small defects found in reviews, each pinned by a test that failed before its fix."""

import importlib

from pretrain_helpers import TINY, tiny_images

import dinokit
from dinokit.data.images import list_images
from dinokit.data.unlabelled import StreamBatchSampler
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
