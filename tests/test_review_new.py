"""Defects found in review of distill_from=, continue_from=, finetune and predict classification."""

import pytest
import torch
from pretrain_helpers import run, tiny_images

from dinokit.train.checkpoint import list_checkpoints, load_checkpoint

FROZEN = dict(lr=0.0, min_lr=0.0, momentum_teacher=1.0, momentum_teacher_end=1.0)  # a step changes no weight


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory):
    """A 2-iteration DINOv2 teacher run and a 2-iteration student distilled from it."""
    root = tmp_path_factory.mktemp("review")
    data = tiny_images(root / "data")
    run(data, root / "teacher", max_iterations=2)
    run(data, root / "student", max_iterations=2, distill_from=str(root / "teacher"))
    return data, root / "teacher", root / "student"


def test_a_distilled_run_can_be_continued_with_masked_ibot(distilled_run, tmp_path):
    """A distilled student saw no masks and has no mask token; continuing it (dinov2, masked iBOT) was a
    ValueError traceback. It starts a fresh (zero) mask token and keeps every other weight."""
    data, _, student = distilled_run
    out = tmp_path / "continued"
    run(data, out, max_iterations=1, continue_from=str(student), **FROZEN)
    before = load_checkpoint(list_checkpoints(student / "checkpoints")[-1])["model"]
    after = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])["model"]
    assert "student.backbone.mask_token" not in before
    assert set(after) - set(before) == {"student.backbone.mask_token", "teacher.backbone.mask_token"}
    assert torch.equal(after["teacher.backbone.mask_token"], torch.zeros(1, 32))
    for name, value in before.items():
        if not name.endswith("_center.center"):
            assert torch.equal(value, after[name]), name
    rows = (out / "metrics.jsonl").read_text()
    assert "ibot_loss" in rows
