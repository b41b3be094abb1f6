"""`continue_from=`: a new run starting from another run's students, teachers, heads and centers
(DINOv2's high-resolution adaptation, continued pretraining with the heads kept)."""

import shutil

import pytest
import torch
import yaml
from pretrain_helpers import finished_run, run

from dinokit.errors import DinokitError
from dinokit.train.checkpoint import list_checkpoints, load_checkpoint


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("continue"), "first")


def test_a_continued_run_starts_from_the_whole_model_state_at_larger_crops(first_run, tmp_path, capsys):
    """With lr 0 and teacher momentum 1 a step changes no weight: after it the new run's students,
    teachers and heads are the first run's, though its crops are 24 px instead of 16 (the position
    embedding interpolated) and head_prototypes=999 was asked for (the first run's 64 are kept)."""
    data, first = first_run
    out = tmp_path / "hires"
    frozen = dict(lr=0.0, min_lr=0.0, momentum_teacher=1.0, momentum_teacher_end=1.0)
    run(data, out, continue_from=str(first), global_crops_size=24, max_iterations=1, head_prototypes=999, **frozen)
    printed = capsys.readouterr().out
    assert "continuing from the students, teachers, heads and centers of" in printed
    assert "head_prototypes=999 -> 64" in printed and "arch=vit_nano_p2 is unused" in printed
    before = load_checkpoint(list_checkpoints(first / "checkpoints")[-1])["model"]
    after = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])["model"]
    assert before.keys() == after.keys()
    for name, value in before.items():
        if not name.endswith("_center.center"):  # the EMA centers move with the new step's teacher outputs
            assert torch.equal(value, after[name]), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["head_prototypes"] == 64 and config["global_crops_size"] == 24
    assert config["continue_from"] == str(first)


def test_a_continued_run_resumes_exactly_without_its_source(first_run, tmp_path):
    data, first = first_run
    source = tmp_path / "source"
    shutil.copytree(first, source)
    keys = dict(continue_from=str(source), epochs=2.0)  # 8 iterations of 8 over 32 images
    run(data, tmp_path / "full", max_iterations=8, **keys)
    run(data, tmp_path / "split", max_iterations=4, **keys)
    shutil.rmtree(source)  # the resumed run's checkpoint holds everything it needs
    run(data, tmp_path / "split", max_iterations=8, resume=True, **keys)
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "checkpoint_00000008.pt")["model"]
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "checkpoint_00000008.pt")["model"]
    assert all(torch.equal(full[k], split[k]) for k in full)
    start = load_checkpoint(list_checkpoints(first / "checkpoints")[-1])["model"]
    qkv = "student.backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(full[qkv], start[qkv])  # it trained


def test_continue_from_refuses_what_it_cannot_start_from(first_run, tmp_path):
    data, first = first_run
    backbone = str(first / "backbone.safetensors")
    with pytest.raises(DinokitError, match=r"it needs the run's heads.*freeze_backbone=1\.0"):
        run(data, tmp_path / "a", max_iterations=1, continue_from=backbone)
    with pytest.raises(DinokitError, match="cannot be combined with init= or distill_from="):
        run(data, tmp_path / "b", max_iterations=1, continue_from=str(first), init=backbone)
