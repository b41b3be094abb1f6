"""Defects found in review of distill_from=, continue_from=, finetune and predict classification."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from pretrain_helpers import run, tiny_images

from dinokit.errors import DinokitError
from dinokit.models import export_model
from dinokit.models.vision_transformer import VisionTransformer, ViTConfig
from dinokit.train.checkpoint import list_checkpoints, load_checkpoint
from dinokit.train.metrics_log import read_metrics

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


def test_distillation_keeps_ibot_loss_weight_0_for_a_student_of_another_patch_size(distilled_run, tmp_path):
    """The patch-size error advised ibot_loss_weight=0, which the teacher's objective then replaced
    (1.0): the advice could not be followed. 0 is kept now and the CLS alone is distilled."""
    data, teacher, _ = distilled_run
    config = ViTConfig(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, init_values=None)
    init = export_model(VisionTransformer(config), tmp_path / "p4.safetensors", format="dinokit")
    with pytest.raises(DinokitError, match="ibot_loss_weight=0 to distil the CLS only"):
        run(data, tmp_path / "masked", max_iterations=1, distill_from=str(teacher), init=init)
    out = tmp_path / "cls_only"
    run(data, out, max_iterations=2, distill_from=str(teacher), init=init, ibot_loss_weight=0)
    assert yaml.safe_load((out / "config.yaml").read_text())["ibot_loss_weight"] == 0.0
    rows = read_metrics(out / "metrics.jsonl")
    assert rows and all("ibot_loss" not in r and r["dino_loss"] > 0 for r in rows)
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])["model"]
    assert not any("ibot" in k for k in state)
    run(data, out, max_iterations=4, distill_from=str(teacher), init=init, ibot_loss_weight=0, resume=True)


def test_a_finetune_run_as_distill_from_or_continue_from_names_its_backbone_as_init(distilled_run, tmp_path):
    """A fine-tuning run folder has checkpoints/ with config and model too: distill_from= failed with
    'the teacher does not match its own settings' and a page of missing keys, continue_from= with a bare
    ValueError. Both now say what the folder is and name init=<its backbone.safetensors>."""
    data, _, _ = distilled_run
    finetuned = tmp_path / "ft"
    (finetuned / "checkpoints").mkdir(parents=True)
    torch.save(
        {"config": {"train": "x"}, "model": {"backbone.cls_token": torch.zeros(1, 1, 8), "head.bias": torch.zeros(2)}},
        finetuned / "checkpoints" / "checkpoint_00000003.pt",
    )
    (finetuned / "backbone.safetensors").write_bytes(b"")
    init = re.escape(f"init={finetuned / 'backbone.safetensors'}")
    with pytest.raises(
        DinokitError, match=rf"distill_from=.*not a dinokit pretraining run.*{init}.*freeze_backbone=1\.0"
    ):
        run(data, tmp_path / "d", max_iterations=1, distill_from=str(finetuned))
    with pytest.raises(DinokitError, match=rf"continue_from=.*not a dinokit pretraining run.*{init}"):
        run(data, tmp_path / "c", max_iterations=1, continue_from=str(finetuned))


def test_a_distillation_resumes_from_its_teacher_checkpoint_after_the_teacher_run_went_on(tmp_path):
    """distill_from=RUN read RUN's newest checkpoint again on resume: once the teacher run was resumed
    and saved a newer one, the student's resume was refused (another teacher) though the checkpoint it
    started from was still there. It reads that checkpoint now, and resumes exactly."""
    data = tiny_images(tmp_path / "data")
    teacher = tmp_path / "teacher"
    run(data, teacher, max_iterations=2, keep_checkpoints=0)
    keys = dict(distill_from=str(teacher), epochs=1.0)  # 4 iterations
    run(data, tmp_path / "full", max_iterations=4, **keys)
    run(data, tmp_path / "split", max_iterations=2, **keys)
    run(data, teacher, max_iterations=4, keep_checkpoints=0, resume=True)  # the teacher run goes on
    assert len(list_checkpoints(teacher / "checkpoints")) == 2
    run(data, tmp_path / "split", max_iterations=4, resume=True, **keys)
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "checkpoint_00000004.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "checkpoint_00000004.pt")
    assert split["distill_teacher_checkpoint"] == str(teacher.resolve() / "checkpoints" / "checkpoint_00000002.pt")
    assert all(torch.equal(full["model"][k], split["model"][k]) for k in full["model"])
    list_checkpoints(teacher / "checkpoints")[0].unlink()  # gone: the newest is another teacher
    with pytest.raises(DinokitError, match=r"another teacher.*back at .*checkpoint_00000002\.pt"):
        run(data, tmp_path / "split", max_iterations=6, resume=True, **keys)


def test_finetune_resumed_after_its_last_epoch_still_counts_the_unreadable_val_files(tmp_path, monkeypatch):
    """A run stopped after its last checkpoint but before its outputs (a crash, a kill while exporting)
    resumes straight to the outputs without evaluating val again: the unreadable val files were not in
    the checkpoint, so finetune.json counted none and every val image as read."""
    from test_finetune import colour_images
    from test_finetune import run as finetune_run

    from dinokit.train.finetune import Finetuner

    root = colour_images(tmp_path / "d", {"train": 4, "val": 2})
    (root / "val" / "blue" / "broken.png").write_bytes(b"")

    def crash(self):
        raise RuntimeError("killed while exporting")

    monkeypatch.setattr(Finetuner, "write_outputs", crash)
    with pytest.raises(RuntimeError, match="killed"):
        finetune_run(root, tmp_path / "run", epochs=1)
    monkeypatch.undo()
    result = finetune_run(root, tmp_path / "run", epochs=1, resume=True)
    assert (result["val_bad_files"], result["val_images"]) == (1, 6)
    assert result["bad_files"] == [str(root / "val" / "blue" / "broken.png")]


def test_a_continued_run_resumed_with_its_first_command_keeps_the_sources_objective(distilled_run, tmp_path):
    """continue_from= replaces head_prototypes=999 by the source's 64; resumed with the same command,
    the given 999 was taken (the source is not read again) and loading the checkpoint failed with a
    RuntimeError of size mismatches. The saved objective and head sizes hold now."""
    data, teacher, _ = distilled_run
    keys = dict(continue_from=str(teacher), head_prototypes=999, epochs=1.0)
    run(data, tmp_path / "full", max_iterations=4, **keys)
    run(data, tmp_path / "split", max_iterations=2, **keys)
    run(data, tmp_path / "split", max_iterations=4, resume=True, **keys)
    assert yaml.safe_load((tmp_path / "split" / "config.yaml").read_text())["head_prototypes"] == 64
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "checkpoint_00000004.pt")["model"]
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "checkpoint_00000004.pt")["model"]
    assert all(torch.equal(full[k], split[k]) for k in full)


def test_predict_finds_the_fine_tuned_backbone_beside_its_head_in_a_moved_run_folder(tmp_path):
    """classifier.safetensors records its backbone as an absolute path in the same run folder: once the
    folder was moved (or copied to another machine), predict failed ('cannot be loaded') though the
    backbone was beside the head. It reads it from there now (the weights hash still checked)."""
    import shutil

    from test_finetune import colour_images
    from test_finetune import run as finetune_run

    from dinokit.eval.classification import predict_classification

    root = colour_images(tmp_path / "d", {"train": 4, "val": 2})
    finetune_run(root, tmp_path / "run", epochs=1)
    before = predict_classification(str(tmp_path / "run"), str(root / "val"), str(tmp_path / "a.json"), num_workers=0)
    shutil.move(tmp_path / "run", tmp_path / "moved")
    after = predict_classification(str(tmp_path / "moved"), str(root / "val"), str(tmp_path / "b.json"), num_workers=0)
    assert Path(after).read_text() == Path(before).read_text()
    other = tmp_path / "other.safetensors"
    shutil.copy(tmp_path / "moved" / "backbone.safetensors", other)
    (tmp_path / "moved" / "backbone.safetensors").write_bytes(other.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(DinokitError, match="weights hash"):
        predict_classification(str(tmp_path / "moved"), str(root / "val"), str(tmp_path / "c.json"), num_workers=0)


def test_a_distillation_resumed_with_ibot_loss_weight_0_keeps_its_ibot(distilled_run, tmp_path):
    """ibot_loss_weight may be given on resume (the teacher's value replaces it), but 0 now means
    CLS-only distillation: a run that started with iBOT keeps it instead of failing to load its
    checkpoint into a model without iBOT."""
    data, teacher, _ = distilled_run
    out = tmp_path / "student"
    run(data, out, max_iterations=2, distill_from=str(teacher))
    run(data, out, max_iterations=4, distill_from=str(teacher), ibot_loss_weight=0, resume=True)
    assert yaml.safe_load((out / "config.yaml").read_text())["ibot_loss_weight"] == 1.0
    assert all("ibot_loss" in row for row in read_metrics(out / "metrics.jsonl"))
