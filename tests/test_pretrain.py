"""End-to-end pretraining runs on a tiny model: learning, run folder, resume, bad input."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from pretrain_helpers import TINY, run, tiny_images
from safetensors.torch import load_file

import dinokit
from dinokit.errors import DinokitError
from dinokit.train.checkpoint import list_checkpoints, load_checkpoint
from dinokit.train.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]


# Sinkhorn-Knopp targets at a fixed teacher temperature: the loss measures how well the student matches
# balanced teacher assignments, and falls as it learns (with EMA centering and a temperature warm-up
# the teacher's own entropy, part of the cross-entropy, rises in a short run).
LEARNS = dict(
    centering="sinkhorn_knopp", layerscale=0, lr=0.005, lr_scaling="none", teacher_temp_start=0.04, teacher_temp=0.04
)


def test_loss_falls_and_run_folder_is_complete(tmp_path):
    data = tiny_images(tmp_path / "data")
    summary = run(data, tmp_path / "run", max_iterations=40, tensorboard=True, log_every=4, **LEARNS)
    out = tmp_path / "run"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(4, 41, 4))
    first, last = rows[0], rows[-1]
    for key in (
        "loss",
        "dino_loss",
        "ibot_loss",
        "koleo_loss",
        "lr",
        "weight_decay",
        "momentum",
        "teacher_temp",
        "img_per_s",
        "data_wait",
        "teacher_entropy",
        "teacher_kl_uniform",
        "cls_spread",
        "epoch",
    ):
        assert key in last, key
    assert last["loss"] < 0.8 * first["loss"] and last["dino_loss"] < 0.8 * first["dino_loss"]
    assert last["ibot_loss"] < first["ibot_loss"]
    assert 0 <= last["data_wait"] <= 1 and last["img_per_s"] > 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["arch"] == "vit_nano_p2" and config["head_prototypes"] == 64 and config["derived"]["files"] == 32
    assert list((out / "tensorboard").glob("events.*"))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint_00000040.pt"]
    backbone = dinokit.load_model(out / "backbone.safetensors")
    teacher = load_checkpoint(out / "checkpoints" / "checkpoint_00000040.pt")["model"]
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, teacher[f"teacher.backbone.{name}"]), name
    assert summary["iterations"] == 40 and summary["epochs"] == 10.0


def test_epochs_are_real_passes_and_dino_objective(tmp_path):
    data = tiny_images(tmp_path / "data")
    summary = run(data, tmp_path / "run", epochs=2, objective="dino", batch_size=6, log_every=100)
    assert summary["iterations"] == 11  # ceil(2 * 32 / 6)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["iteration"] == 11 and "ibot_loss" not in rows[-1] and "koleo_loss" not in rows[-1]
    assert dinokit.load_model(tmp_path / "run" / "backbone.safetensors").mask_token is None


def test_cpu_runs_reuse_freed_memory_unless_switched_off(tmp_path, monkeypatch):
    import contextlib

    pretrain_module = importlib.import_module("dinokit.train.pretrain")
    entered = []

    @contextlib.contextmanager
    def recording(enabled: bool = True):
        entered.append(enabled)
        yield enabled

    monkeypatch.setattr(pretrain_module, "reuse_freed_memory", recording)
    data = tiny_images(tmp_path / "data")
    run(data, tmp_path / "on", max_iterations=1)
    assert entered == [True]  # a CPU run
    run(data, tmp_path / "off", max_iterations=1, reuse_freed_memory=False)
    assert entered == [True, False]
    saved = yaml.safe_load((tmp_path / "off" / "config.yaml").read_text())
    assert saved["reuse_freed_memory"] is False


def test_resume_continues_exactly(tmp_path):
    """4 + 4 iterations with a restart (and a data-loader worker in one part) give the same
    parameters as 8 iterations in one go."""
    data = tiny_images(tmp_path / "data")
    schedule = dict(epochs=2.0)  # 8 iterations of 8 images over 32 images: the schedule both runs share
    run(data, tmp_path / "full", max_iterations=8, **schedule)
    run(data, tmp_path / "split", max_iterations=4, num_workers=1, **schedule)
    run(data, tmp_path / "split", max_iterations=8, resume=True, **schedule)
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "checkpoint_00000008.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "checkpoint_00000008.pt")
    assert full["samples_seen"] == split["samples_seen"] == 64
    for name, value in full["model"].items():
        assert torch.equal(value, split["model"][name]), name
    rows = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [2, 4, 6, 8]


def start_command_line_run(data, out, **keys) -> subprocess.Popen:
    """`python -m dinokit pretrain` of TINY with `keys` in a subprocess; its output (text) in .stdout."""
    args = [f"{k}={v}" for k, v in {**TINY, **keys}.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "dinokit", "pretrain", f"data={data}", f"out={out}", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run folder) of an uninterrupted TINY run of 10 epochs (40 iterations): the parameters the
    interrupted runs below must reach. The run is made once for them; they only read it."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = tiny_images(root / "data")
    run(data, root / "full", epochs=10.0)  # 40 iterations
    return data, root / "full"


def assert_same_parameters_at_40(full, resumed):
    """The checkpoints of iteration 40 of two runs hold the same model parameters, bit for bit."""
    a = load_checkpoint(full / "checkpoints" / "checkpoint_00000040.pt")["model"]
    b = load_checkpoint(resumed / "checkpoints" / "checkpoint_00000040.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_to_the_same_parameters(tmp_path, uninterrupted_run):
    """SIGKILL a command-line run after a checkpoint; resuming reaches the uninterrupted parameters."""
    data, full = uninterrupted_run
    out = tmp_path / "killed"
    process = start_command_line_run(data, out, epochs=10.0, checkpoint_every=4)
    deadline = time.time() + 120
    while len(list_checkpoints(out / "checkpoints")) < 2:  # checkpoint 8 written
        assert process.poll() is None and time.time() < deadline, "training did not reach a checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    reached = list_checkpoints(out / "checkpoints")[-1].name
    assert reached < "checkpoint_00000040.pt", "the run finished before it was killed"
    run(data, out, epochs=10.0, resume=True)
    assert_same_parameters_at_40(full, out)


def test_sigterm_stops_after_a_step_with_a_checkpoint_and_resume_reaches_the_same_parameters(
    tmp_path, uninterrupted_run
):
    """A scheduler's SIGTERM (pre-emption) mid-run: the run finishes its step, saves a checkpoint at the
    iteration it reached (none was due: checkpoint_every=0), exits with 143, and resuming gives the
    uninterrupted parameters. The loader's worker ignores the signal (the main process ends it)."""
    data, full = uninterrupted_run
    out = tmp_path / "stopped"
    process = start_command_line_run(data, out, epochs=10.0, num_workers=1)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():  # iteration 2 done
        assert process.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    (checkpoint,) = list_checkpoints(out / "checkpoints")
    reached = load_checkpoint(checkpoint)["iteration"]
    assert 2 <= reached < 40 and f"stopped by SIGTERM at iteration {reached}, checkpoint saved" in output
    assert "resume=true" in output and not (out / "backbone.safetensors").exists()
    run(data, out, epochs=10.0, num_workers=1, resume=True)
    assert_same_parameters_at_40(full, out)


def test_a_sigterm_repeated_while_the_stop_checkpoint_is_written_is_ignored(tmp_path, monkeypatch):
    """One stop can reach a process twice (SLURM's proctrack/linuxproc signals every process of a job
    step and torchrun passes its own SIGTERM on); a copy that arrives while the stopped run writes its
    checkpoint must not end the process before it is written. The SIGTERM handler in place before the
    run stands for the default one (which would kill the process) and records whether it acted."""
    module = importlib.import_module("dinokit.train.pretrain")  # the module; dinokit.train.pretrain is the function
    acted = []
    before = signal.signal(signal.SIGTERM, lambda *_: acted.append(1))
    try:
        step, save = module.Trainer.step, module.save_checkpoint

        def stopping_step(self, *args):
            if self.iteration == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # the stop
            return step(self, *args)

        def save_with_the_stop_again(folder, iteration, *args):
            os.kill(os.getpid(), signal.SIGTERM)  # the same stop, delivered again during the last save
            time.sleep(0.01)  # the handler runs between bytecodes
            return save(folder, iteration, *args)

        monkeypatch.setattr(module.Trainer, "step", stopping_step)
        monkeypatch.setattr(module, "save_checkpoint", save_with_the_stop_again)
        with pytest.raises(SystemExit) as exit_:
            run(tiny_images(tmp_path / "data"), tmp_path / "run", max_iterations=20)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert exit_.value.code == 143 and acted == []
    (checkpoint,) = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert load_checkpoint(checkpoint)["iteration"] == 3


def test_a_run_stopped_by_sigterm_that_then_fails_gives_the_signal_handlers_back(tmp_path, monkeypatch):
    """A stopped run keeps its handlers until its last checkpoint; one that fails before it (here closing
    metrics.jsonl on a full disk) must still give them back, as any failing run does: else SIGTERM stays
    ignored in the calling process (a notebook's kernel) and Ctrl-C is caught by a finished run."""
    from dinokit.train.metrics_log import MetricsLog

    module = importlib.import_module("dinokit.train.pretrain")  # the module; dinokit.train.pretrain is the function
    step = module.Trainer.step

    def stopping_step(self, *args):
        if self.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the stop
        return step(self, *args)

    def close_on_a_full_disk(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module.Trainer, "step", stopping_step)
    monkeypatch.setattr(MetricsLog, "close", close_on_a_full_disk)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(OSError, match="No space left on device"):
            run(tiny_images(tmp_path / "data"), tmp_path / "run", max_iterations=20)
        after = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert after == before


def test_ctrl_c_acts_at_once_during_the_last_checkpoint_of_a_process_stopped_by_another(tmp_path, monkeypatch):
    """A process that stops because another one was signalled keeps SIGTERM handled through its last
    checkpoint (the stop may still reach it), but Ctrl-C acts at once there, as on the signalled
    processes: a stuck save is not held up by a Ctrl-C swallowed on some processes only."""
    module = importlib.import_module("dinokit.train.pretrain")  # the module; dinokit.train.pretrain is the function
    shared_clock, save = module.Trainer.shared_clock, module.save_checkpoint

    def stopped_elsewhere(self, start, requested):  # as when another process got the signal
        elapsed, _ = shared_clock(self, start, requested)
        return elapsed, self.iteration == 2

    during_save = []

    def recording_save(*args):
        during_save.append({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
        return save(*args)

    monkeypatch.setattr(module.Trainer, "shared_clock", stopped_elsewhere)
    monkeypatch.setattr(module, "save_checkpoint", recording_save)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):  # stopped by a signal to another process
        run(tiny_images(tmp_path / "data"), tmp_path / "run", max_iterations=20)
    assert {s: signal.getsignal(s) for s in before} == before
    (last,) = during_save
    assert last[signal.SIGINT] == before[signal.SIGINT]  # Ctrl-C: as usual
    assert last[signal.SIGTERM] != before[signal.SIGTERM]  # SIGTERM: still the stop's handler
    assert load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])["iteration"] == 2


def test_stop_signals_ask_once_then_act_as_usual():
    from dinokit.runtime import StopSignals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert stop.requested == "SIGTERM"  # still alive: asked, not killed
        with pytest.raises(KeyboardInterrupt):  # the second signal acts as usual
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with pytest.raises(SystemExit) as exit_:
        stop.raise_requested()
    assert exit_.value.code == 143
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
    assert stop.requested == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        stop.raise_requested()


def test_metrics_of_a_run_killed_before_its_first_checkpoint_are_not_repeated(tmp_path, monkeypatch):
    """A run killed before any checkpoint restarts from iteration 0 under resume=true: its rows are
    replaced, not followed by a second 2, 4, ...; a row cut short by a crash does not stop a resume."""
    data = tiny_images(tmp_path / "data")
    trainer = importlib.import_module("dinokit.train.pretrain").Trainer

    def killed(self, elapsed):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            run(data, tmp_path / "run", max_iterations=4)
    assert [r["iteration"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [2, 4]
    run(data, tmp_path / "run", max_iterations=4, resume=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert [r["iteration"] for r in read_metrics(metrics)] == [2, 4]
    metrics.write_text(metrics.read_text()[:-20])  # the row of iteration 4 cut short (a full disk)
    run(data, tmp_path / "run", max_iterations=6, resume=True)
    assert [r["iteration"] for r in read_metrics(metrics)] == [2, 6]


def test_a_second_run_into_a_folder_still_training_is_refused(tmp_path, monkeypatch):
    """resume=true while the run is still training (a job queued twice) is refused: both processes
    wrote its checkpoints and metrics.jsonl, and each rewrote the file on start, losing the other's rows."""
    data = tiny_images(tmp_path / "data")
    trainer = importlib.import_module("dinokit.train.pretrain").Trainer
    real_save = trainer.save
    started = []

    def save_then_start_another_run(self, elapsed):
        real_save(self, elapsed)
        if not started:
            started.append(True)
            with pytest.raises(DinokitError, match="another process is writing a pretraining run in"):
                run(data, tmp_path / "run", max_iterations=8, resume=True)

    monkeypatch.setattr(trainer, "save", save_then_start_another_run)
    run(data, tmp_path / "run", max_iterations=8, checkpoint_every=4)
    assert started
    assert [r["iteration"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [2, 4, 6, 8]
    run(data, tmp_path / "run", max_iterations=10, resume=True)  # the lock went with the first run


def test_bad_files_are_skipped_and_counted(tmp_path, capsys):
    data = tiny_images(tmp_path / "data")
    for name, content in (("empty.jpg", b""), ("text.png", b"hello"), ("half.png", b"\x89PNG\r\n\x1a\n\0\0")):
        (data / "circle" / name).write_bytes(content)
    summary = run(data, tmp_path / "run", max_iterations=12)
    assert summary["bad_files"] == 3
    out = capsys.readouterr().out
    first = out.splitlines()[0]  # before training the files are only listed, not decoded: not called images
    assert first.startswith("pretrain: 35 files found (unreadable ones are skipped when met") and "images" not in first
    assert "pretrain: 3 unreadable file(s) skipped, listed in" in out
    listed = (tmp_path / "run" / "bad_files.txt").read_text().split()
    assert sorted(Path(p).name for p in listed) == ["empty.jpg", "half.png", "text.png"]
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["bad_files"] == 3


def test_clear_errors_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DinokitError, match="no images found"):
        run(tmp_path / "empty", tmp_path / "a", max_iterations=1)
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DinokitError, match="could be read"):
        run(broken, tmp_path / "b", max_iterations=1)
    with pytest.raises(DinokitError, match="unknown pretraining key"):
        run(tmp_path / "empty", tmp_path / "c", learning_rate=0.1)
    with pytest.raises(DinokitError, match="unknown preset"):
        dinokit.pretrain(data=str(tmp_path), out=str(tmp_path / "d"), preset="dinov3_vit7b")


def test_crops_that_do_not_tile_into_patches_are_refused_before_the_run_folder_is_made(tmp_path):
    data = tiny_images(tmp_path / "data")
    with pytest.raises(DinokitError, match="local_crops_size 9 is not a multiple of the patch size 2; use 8 or 10"):
        run(data, tmp_path / "run", max_iterations=1, local_crops_size=9)
    assert not (tmp_path / "run" / "config.yaml").exists()  # so the same out= can be used again
    run(data, tmp_path / "run", max_iterations=1)
    with pytest.raises(DinokitError, match="blur_kernel_size must be odd"):
        run(data, tmp_path / "blur", max_iterations=1, blur_kernel_size=4)


@pytest.mark.parametrize(
    "key, value",
    [("num_workers", -1), ("local_crops_number", -1), ("max_iterations", -1), ("epochs", -1.0), ("max_minutes", -1.0)],
)
def test_negative_counts_are_refused_before_the_run_folder_is_made(tmp_path, key, value):
    data = tiny_images(tmp_path / "data")  # were a traceback (workers, crops) or a "finished" run of 0 steps
    with pytest.raises(DinokitError, match=f"{key} must be"):
        run(data, tmp_path / "run", **{"max_iterations": 1, key: value})
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_existing_run_is_never_overwritten_and_resume_keeps_the_config(tmp_path):
    data = tiny_images(tmp_path / "data")
    run(data, tmp_path / "run", max_iterations=2)
    with pytest.raises(DinokitError, match="already holds a run"):
        run(data, tmp_path / "run", max_iterations=2)
    with pytest.raises(DinokitError, match="lr"):
        run(data, tmp_path / "run", max_iterations=4, resume=True, lr=0.5)


def test_resume_refuses_other_data_but_follows_the_same_images_elsewhere(tmp_path, capsys):
    import shutil

    data = tiny_images(tmp_path / "a")
    run(data, tmp_path / "run", max_iterations=2)
    other = tiny_images(tmp_path / "b", per_class=3)
    with pytest.raises(DinokitError, match=r"trained on 32 images, but data=.* holds 24 images.*init=.*backbone"):
        run(other, tmp_path / "run", max_iterations=4, resume=True)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"] == str(data)  # untouched
    moved = shutil.copytree(data, tmp_path / "mounted" / "train")  # the same images at another path
    assert run(moved, tmp_path / "run", max_iterations=4, resume=True)["iterations"] == 4
    run(
        other,
        tmp_path / "next",
        max_iterations=1,
        init=str(tmp_path / "run" / "backbone.safetensors"),
        arch="vit_micro_p4",
    )
    assert "arch=vit_micro_p4 is unused" in capsys.readouterr().out
    derived = yaml.safe_load((tmp_path / "next" / "config.yaml").read_text())["derived"]
    assert derived["backbone"].startswith("from init: 32 wide, 2 blocks, 2 heads, patch 2")


def test_init_from_weights_with_fresh_heads_and_frozen_backbone_warmup(tmp_path):
    data = tiny_images(tmp_path / "data")
    run(data, tmp_path / "first", max_iterations=4)
    init = tmp_path / "first" / "backbone.safetensors"
    run(data, tmp_path / "second", max_iterations=4, init=str(init), freeze_backbone=1.0)
    before, after = load_file(init), load_file(tmp_path / "second" / "backbone.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # backbone frozen throughout
    state = load_checkpoint(tmp_path / "second" / "checkpoints" / "checkpoint_00000004.pt")["model"]
    first = load_checkpoint(tmp_path / "first" / "checkpoints" / "checkpoint_00000004.pt")["model"]
    head = "student.dino_head.mlp.0.weight"
    assert not torch.equal(state[head], first[head])  # fresh heads, then trained


def test_cli_help_and_command(tmp_path, capsys):
    """In process: start_command_line_run's tests run `python -m dinokit pretrain` in a fresh interpreter
    (which costs 3-5 s of imports alone), and test_pretrain_ddp reads its summary under torchrun."""
    from dinokit.cli import main

    assert main(["pretrain", "--help"]) == 0
    help_text = capsys.readouterr().out
    for key in ("max_iterations", "max_minutes", "epochs", "batch_size", "checkpoint_every", "resume", "init"):
        assert key in help_text
    data = tiny_images(tmp_path / "data")
    args = [f"{k}={v}" for k, v in TINY.items()] + ["max_iterations=2", f"data={data}", f"out={tmp_path / 'run'}"]
    assert main(["pretrain", *args]) == 0
    stdout = capsys.readouterr().out
    assert json.loads(stdout[stdout.index("{") :])["iterations"] == 2


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    from dinokit.train.self_distillation import SelfDistillation

    data = tiny_images(tmp_path / "data")
    original = SelfDistillation.losses
    calls = {"n": 0}

    def sometimes_nan(self, *args, **kwargs):
        parts = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 4):  # iterations 3 and 4 blow up
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(SelfDistillation, "losses", sometimes_nan)
    summary = run(data, tmp_path / "run", max_iterations=6)
    assert summary["skipped_steps"] == 2 and summary["iterations"] == 6
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["skipped_steps"] == 2
    teacher = load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_00000006.pt")["model"]
    assert all(torch.isfinite(v).all() for v in teacher.values() if v.is_floating_point())

    def always_nan(self, *args, **kwargs):
        parts = original(self, *args, **kwargs)
        parts["loss"] = parts["loss"] * float("inf")
        return parts

    monkeypatch.setattr(SelfDistillation, "losses", always_nan)
    with pytest.raises(DinokitError, match="3 steps in a row"):
        run(data, tmp_path / "run2", max_iterations=6, nan_patience=3)


def test_collapse_figures_by_hand():
    from dinokit.train.self_distillation import collapse_figures

    uniform = torch.full((4, 8), 1 / 8)
    spread = collapse_figures(uniform, torch.eye(4, 6))  # 4 orthogonal unit vectors: mean norm^2 = 1/4
    assert spread["teacher_entropy"] == pytest.approx(1.0) and spread["teacher_kl_uniform"] == pytest.approx(0.0)
    assert spread["cls_spread"] == pytest.approx((1 - 1 / 4) ** 0.5)
    one_hot = torch.zeros(4, 8)
    one_hot[:, 3] = 1.0
    collapsed = collapse_figures(one_hot, torch.ones(4, 6))
    assert collapsed["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["teacher_kl_uniform"] == pytest.approx(1.0)
    assert collapsed["cls_spread"] == pytest.approx(0.0, abs=1e-6)


def test_batched_augmentation_learns_resumes_exactly_and_skips_bad_files(tmp_path, capsys):
    """augmentation=batched (in-memory images, whole-batch crops): the loss falls, 4 + 4 iterations
    with a restart equal 8 in one go, and unreadable files are counted as in the per-image path."""
    data = tiny_images(tmp_path / "data")
    (data / "circle" / "empty.jpg").write_bytes(b"")
    batched = dict(augmentation="batched", epochs=2.0, **LEARNS)
    run(data, tmp_path / "full", max_iterations=8, **batched)
    # every file is decoded before training: the first line already knows the unreadable one
    assert capsys.readouterr().out.startswith("pretrain: 33 files found, 1 unreadable file(s) skipped, 1 process(es)")
    run(data, tmp_path / "split", max_iterations=4, **batched)
    summary = run(data, tmp_path / "split", max_iterations=8, resume=True, **batched)
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "checkpoint_00000008.pt")["model"]
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "checkpoint_00000008.pt")["model"]
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert summary["bad_files"] == 1
    assert (tmp_path / "split" / "bad_files.txt").read_text().strip().endswith("empty.jpg")
    config = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())
    assert config["augmentation"] == "batched" and "BatchedMultiCrop" in config["derived"]["augmentation"]
    long = run(data, tmp_path / "long", max_iterations=40, log_every=4, augmentation="batched", **LEARNS)
    rows = read_metrics(tmp_path / "long" / "metrics.jsonl")
    assert rows[-1]["dino_loss"] < 0.8 * rows[0]["dino_loss"] and long["iterations"] == 40


def test_progress_bar_shows_what_metrics_jsonl_logs(tmp_path, capsys):
    from dinokit.train.metrics_log import progress_postfix

    data = tiny_images(tmp_path / "data")
    summary = run(data, tmp_path / "run", max_iterations=4, progress=True)
    bar = capsys.readouterr().err
    shown = progress_postfix(summary["last_metrics"])
    assert set(shown) == {"loss", "lr", "wd", "mom", "temp", "ent", "spread", "img_s", "wait"}
    for key in ("loss", "lr", "wd", "mom", "temp", "ent", "spread"):  # the last row's values, compactly
        assert f"{key}={shown[key]}" in bar, key
        assert len(shown[key]) <= 8, shown[key]


def test_ibot_with_a_separate_head_learns(tmp_path):
    data = tiny_images(tmp_path / "data")
    separate = dict(ibot_separate_head=True, ibot_prototypes=32, ibot_hidden_dim=24, ibot_bottleneck_dim=8)
    run(data, tmp_path / "run", max_iterations=24, log_every=4, **separate, **LEARNS)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor([r["loss"], r["ibot_loss"]])).all() for r in rows)
    assert rows[-1]["ibot_loss"] < rows[0]["ibot_loss"] and rows[-1]["loss"] < rows[0]["loss"]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_00000024.pt")["model"]
    assert state["ibot_center.center"].shape == (1, 32) and state["dino_center.center"].shape == (1, 64)
    assert state["student.ibot_head.last_layer.parametrizations.weight.original1"].shape == (32, 8)
    student, teacher = state["student.ibot_head.mlp.0.weight"], state["teacher.ibot_head.mlp.0.weight"]
    assert student.shape == (24, 32) and not torch.equal(student, teacher)  # trained, the teacher follows


class FakeClock:
    """time.perf_counter that advances 10 seconds at every call."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 10.0
        return self.now


def test_checkpoint_every_minutes_writes_checkpoints(tmp_path, monkeypatch):
    module = importlib.import_module("dinokit.train.pretrain")  # the module; dinokit.train.pretrain is the function
    monkeypatch.setattr(module, "time", FakeClock())
    data = tiny_images(tmp_path / "data")
    run(data, tmp_path / "run", max_iterations=4, checkpoint_every_minutes=1.0, keep_checkpoints=0)
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(saved) >= 2 and saved[-1].name == "checkpoint_00000004.pt"
    first = load_checkpoint(saved[0])
    assert first["iteration"] < 4 and first["elapsed_seconds"] >= 60.0


def test_collapse_is_warned_once_after_the_warm_up(tmp_path):
    from dinokit.train.config import resolve_config
    from dinokit.train.pretrain import Trainer
    from dinokit.train.self_distillation import collapse_figures

    data = tiny_images(tmp_path / "data")
    keys = {k: v for k, v in TINY.items() if k != "preset"}
    cfg = resolve_config(TINY["preset"], {**keys, "max_iterations": 100})
    trainer = Trainer(cfg, str(data), tmp_path / "run", None, torch.device("cpu"), False)
    trainer.iteration = 50
    healthy = collapse_figures(torch.eye(4, 8) * 0.92 + 0.01, torch.eye(4, 6))  # peaked, on different prototypes
    one_hot = torch.zeros(4, 8)
    one_hot[:, 3] = 1.0
    collapsed = collapse_figures(one_hot, torch.ones(4, 6))
    row = {"iteration": 50, "minutes": 1.0}
    assert trainer.warn_collapse({**row, **healthy}, False) is False
    with pytest.warns(UserWarning, match=r"possible collapse: teacher CLS .*spread 0.000.*same prototypes"):
        assert trainer.warn_collapse({**row, **collapsed}, False) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.warn_collapse({**row, **collapsed}, True) is True  # once per run
        trainer.iteration = 10  # still in the warm-up: no verdict yet
        assert trainer.warn_collapse({**row, **collapsed, "iteration": 10}, False) is False


def test_every_shipped_preset_resolves_to_a_known_architecture_and_whole_patch_grids():
    from dinokit.models.architectures import ARCHITECTURES
    from dinokit.train.config import list_presets, resolve_config

    assert {"cpu32", "cpu96", "demo", "dinov2_vits14", "dino_vits16"} <= set(list_presets())
    for name in list_presets():
        cfg = resolve_config(name, {})
        patch = ARCHITECTURES[cfg.arch].patch_size
        assert cfg.global_crops_size % patch == 0 and cfg.local_crops_size % patch == 0, name
    # cpu96 is cpu32 scaled for 96 px images: 8 px patches, crops of the same 4 x 4 / 2 x 2 patches.
    cpu32, cpu96 = resolve_config("cpu32", {}), resolve_config("cpu96", {})
    assert ARCHITECTURES[cpu96.arch].patch_size == 8 and (cpu96.global_crops_size, cpu96.local_crops_size) == (32, 16)
    for size in ("global_crops_size", "local_crops_size"):
        grid = getattr(cpu96, size) // 8
        assert grid == getattr(cpu32, size) // ARCHITECTURES[cpu32.arch].patch_size
    same = ("lr", "batch_size", "head_prototypes", "teacher_temp", "momentum_teacher", "koleo_loss_weight")
    assert all(getattr(cpu96, k) == getattr(cpu32, k) for k in same)


def test_a_refused_run_leaves_no_folder_behind(tmp_path, capsys):
    from dinokit.cli import main

    data = tiny_images(tmp_path / "data")
    out = tmp_path / "runs" / "r9"
    assert main(["pretrain", f"data={data}", f"out={out}", "preset=cpu32", "objective=dinov3"]) == 2
    assert "objective" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
def test_no_logits_are_kept_through_a_backward(tmp_path, monkeypatch, centering):
    """The teacher's logits (M x K, 80-90 MB in a DINOv2 ViT-S/14 step) are let go before the backward,
    where the step's memory peaks: the centers keep only row sums, the metrics only the teacher's CLS
    rows. Of the student's, only the patch logits are alive when a backward starts: the iBOT loss keeps
    them, in their own dtype, in place of float32 log-probabilities (`SoftCrossEntropy`). No logits of
    the previous step may still be alive."""
    import gc
    import weakref

    from dinokit.train.self_distillation import SelfDistillation

    logits: list[tuple[str, weakref.ref]] = []
    teacher_outputs, losses, backward = SelfDistillation.teacher_outputs, SelfDistillation.losses, torch.Tensor.backward

    def record(outputs: dict, whose: str) -> None:
        logits.extend((f"{whose} {k}", weakref.ref(v)) for k, v in outputs.items() if k.endswith("_logits"))

    def recording_teacher_outputs(self, *args, **kwargs):
        outputs = teacher_outputs(self, *args, **kwargs)
        record(outputs, "teacher")
        return outputs

    def recording_losses(self, student, *args, **kwargs):
        record(student, "student")
        return losses(self, student, *args, **kwargs)

    backwards = []

    def checking_backward(self, *args, **kwargs):
        if len([ref for _, ref in logits if ref() is not None]) > 1:  # a full collection over this process: ~1 s
            gc.collect()  # only cyclic garbage may still hold them then
        backwards.append([name for name, ref in logits if ref() is not None])
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(SelfDistillation, "teacher_outputs", recording_teacher_outputs)
    monkeypatch.setattr(SelfDistillation, "losses", recording_losses)
    monkeypatch.setattr(torch.Tensor, "backward", checking_backward)
    data = tiny_images(tmp_path / "data")
    run(data, tmp_path / "run", max_iterations=3, centering=centering, ibot_loss_weight=1.0)
    assert len(logits) == 3 * 4  # per step: teacher and student, CLS and patches
    assert backwards == [["student patch_logits"]] * 3


def test_the_knn_monitor_logs_the_teachers_knn_and_leaves_training_as_it_is(tmp_path):
    """knn_every=2: rows {iteration, knn_top1, knn_seconds} at iterations 2 and 4 and at the end (5);
    the last equals `dinokit eval knn` (k 20) on the exported backbone at the same size and precision;
    the run's weights equal those of the same run without the monitor."""
    from dinokit.data.synthetic import write_classification_set

    data = tiny_images(tmp_path / "data")
    for split, seed in (("train", 3), ("val", 4)):
        write_classification_set(tmp_path / "labelled", per_class=4, size=16, seed=seed, split=split)
    knn = {"knn_train": str(tmp_path / "labelled" / "train"), "knn_val": str(tmp_path / "labelled" / "val")}
    summary = run(data, tmp_path / "with", max_iterations=5, knn_every=2, precision="fp32", **knn)
    run(data, tmp_path / "without", max_iterations=5, precision="fp32")
    rows = [row for row in read_metrics(tmp_path / "with" / "metrics.jsonl") if "knn_top1" in row]
    assert [row["iteration"] for row in rows] == [2, 4, 5]
    assert summary["knn_top1"] == round(rows[-1]["knn_top1"], 2)
    weights = [load_file(tmp_path / name / "backbone.safetensors") for name in ("with", "without")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])

    out = tmp_path / "eval"
    dinokit.cli.main(
        [
            "eval",
            "knn",
            f"model={tmp_path / 'with' / 'backbone.safetensors'}",
            *(f"{k[4:]}={v}" for k, v in knn.items()),
            f"out={out}",
            "image_size=16",
            "precision=fp32",
            "num_workers=0",
            "cache=off",
            "ks=[20]",
        ]
    )
    assert json.loads((out / "knn.json").read_text())["top1"]["20"] == pytest.approx(rows[-1]["knn_top1"], abs=1e-6)


def test_the_knn_monitor_needs_its_data_and_may_change_on_resume(tmp_path):
    data = tiny_images(tmp_path / "data")
    with pytest.raises(DinokitError, match=r"knn_every needs knn_train=\.\.\. and knn_val="):
        run(data, tmp_path / "a", max_iterations=2, knn_every=1)
    with pytest.raises(DinokitError, match="knn_image_size"):
        run(
            data,
            tmp_path / "b",
            max_iterations=2,
            knn_every=1,
            knn_train=str(data),
            knn_val=str(data),
            knn_image_size=15,
        )
    from dinokit.data.synthetic import write_classification_set

    for split, seed in (("train", 3), ("val", 4)):
        write_classification_set(tmp_path / "labelled", per_class=2, size=16, seed=seed, split=split)
    knn = {"knn_train": str(tmp_path / "labelled" / "train"), "knn_val": str(tmp_path / "labelled" / "val")}
    run(data, tmp_path / "c", max_iterations=2)
    summary = run(data, tmp_path / "c", max_iterations=4, resume=True, knn_every=2, **knn)
    assert summary["iterations"] == 4 and "knn_top1" in summary


def test_a_resumed_run_keeps_the_preset_its_config_records(tmp_path):
    """resume=true without preset= (the function's default is dinov2_vits14) keeps config.yaml's preset."""
    data = tiny_images(tmp_path / "data")
    keys = {k: v for k, v in TINY.items() if k != "preset"}
    dinokit.pretrain(data=str(data), out=str(tmp_path / "run"), preset="cpu32", max_iterations=1, **keys)
    dinokit.pretrain(data=str(data), out=str(tmp_path / "run"), resume=True, max_iterations=2)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["preset"] == "cpu32" and saved["augmentation"] == "batched"  # cpu32's


def test_activation_checkpointing_trains_the_same_and_may_change_on_resume(tmp_path, monkeypatch):
    """activation_checkpointing=true recomputes the student's blocks in the backward (4 checkpointed
    block calls a step: 2 blocks x the global and the local crops; none of the teacher, which runs
    without gradients) and changes nothing else: 4 iterations in fp32 with drop path, plain, and
    checkpointed in the first or the last 2 (switched at a resume), give the same losses, checkpoints
    (keys and values) and exported backbone."""
    from dinokit.models.layers import block

    calls = []
    checkpoint = block.checkpoint
    monkeypatch.setattr(block, "checkpoint", lambda *args, **kw: calls.append(1) or checkpoint(*args, **kw))
    data = tiny_images(tmp_path / "data")
    keys = dict(precision="fp32", epochs=1.0, max_iterations=4)  # one epoch: 4 iterations of 8 of 32 images
    run(data, tmp_path / "plain", **keys)
    assert calls == []
    for first, then in ((True, False), (False, True)):
        out = tmp_path / f"{first}_then_{then}"
        run(data, out, activation_checkpointing=first, **{**keys, "max_iterations": 2})
        assert len(calls) == (2 * 4 if first else 0)
        run(data, out, activation_checkpointing=then, resume=True, **keys)
        assert (
            len(calls) == 2 * 4
            and yaml.safe_load((out / "config.yaml").read_text())["activation_checkpointing"] is then
        )
        calls.clear()
    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "checkpoint_00000004.pt")["model"]
    losses = [row["loss"] for row in read_metrics(tmp_path / "plain" / "metrics.jsonl")]
    backbone = load_file(tmp_path / "plain" / "backbone.safetensors")
    for name in ("True_then_False", "False_then_True"):
        other = load_checkpoint(tmp_path / name / "checkpoints" / "checkpoint_00000004.pt")["model"]
        assert list(other) == list(plain), name
        assert all(torch.equal(other[k], plain[k]) for k in plain), name
        assert [row["loss"] for row in read_metrics(tmp_path / name / "metrics.jsonl")] == losses, name
        exported = load_file(tmp_path / name / "backbone.safetensors")
        assert exported.keys() == backbone.keys() and all(torch.equal(exported[k], backbone[k]) for k in backbone)
