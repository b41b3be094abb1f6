"""`dinokit finetune`: the optimiser groups by hand, learning beyond a frozen backbone, the head-only
epochs, exact resume after Ctrl-C, the output files (backbone, head file, result), bad input, and a
two-process torchrun run that matches one process on the same global batch."""

import importlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pretrain_helpers import run_torchrun

import dinokit
from dinokit.cli import run as cli_run
from dinokit.data.finetune_augmentation import SoftTargets
from dinokit.data.images import list_images
from dinokit.errors import DinokitError
from dinokit.eval.backbone import load_backbone, weights_hash
from dinokit.eval.classification import predict_classification
from dinokit.eval.common import make_transform
from dinokit.eval.heads import backbone_for_head, load_head_file
from dinokit.eval.linear import linear_input
from dinokit.features.extract import compute_features
from dinokit.io import folder_lock
from dinokit.models import create_model
from dinokit.train.checkpoint import list_checkpoints, load_checkpoint
from dinokit.train.classifier import Classifier, finetune_groups
from dinokit.train.finetune import Finetuner, finetune
from dinokit.train.optim import apply_schedule, build_optimizer

# A 2-block, 32-dim ViT (patch 2) on 16 px images, fp32 on the CPU: exact and fast.
TINY = dict(
    model="random:vit_nano_p2",
    image_size=16,
    batch_size=8,
    num_workers=0,
    device="cpu",
    precision="fp32",
    progress=False,
    tensorboard=False,
    crop_scale=[0.6, 1.0],
)


def colour_images(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png: 16 px noise images tinted red, green or blue by class."""
    rng = np.random.default_rng(seed)
    tints = {"red": (80, -40, -40), "green": (-40, 80, -40), "blue": (-40, -40, 80)}
    for split, n in per_class.items():
        for name, tint in tints.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.normal(128, 30, (16, 16, 3)) + np.array(tint)
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return colour_images(tmp_path_factory.mktemp("colours"), {"train": 32, "val": 8})


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run (12 steps per epoch) with stochastic depth: the reference run."""
    out = tmp_path_factory.mktemp("runs") / "whole"
    finetune(train=str(data / "train"), val=str(data / "val"), out=str(out), epochs=2, lr=0.1, **TINY)
    return out


def without_minutes(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "minutes"}


def run(data: Path, out: Path, **keys) -> dict:
    path = finetune(train=str(data / "train"), val=str(data / "val"), out=str(out), **{**TINY, **keys})
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------- groups
def test_layer_decay_lrs_and_weight_decay_of_each_parameter_by_hand():
    """2 blocks, decay 0.5: head and final norm x 1, block 1 x 0.5, block 0 x 0.25, embeddings x 0.125;
    no weight decay on biases, norms, LayerScale, CLS and position embedding; no mask token at all."""
    model = Classifier(create_model("vit_nano_p2"), 3)
    optimizer = build_optimizer(finetune_groups(model, 0.5))
    values = {"lr": 0.1, "last_layer_lr": 0.1, "backbone_lr_factor": 1.0, "weight_decay": 0.05}
    apply_schedule(optimizer, values)
    lr, wd = {}, {}
    for group in optimizer.param_groups:
        for name in group["names"]:
            lr[name], wd[name] = group["lr"], group["weight_decay"]
    expected_lr = {
        "head.weight": 0.1,
        "head.bias": 0.1,
        "backbone.norm.weight": 0.1,
        "backbone.blocks.1.attn.qkv.weight": 0.05,
        "backbone.blocks.1.ls2.gamma": 0.05,
        "backbone.blocks.0.mlp.fc1.bias": 0.025,
        "backbone.patch_embed.proj.weight": 0.0125,
        "backbone.cls_token": 0.0125,
        "backbone.pos_embed": 0.0125,
    }
    for name, value in expected_lr.items():
        assert lr[name] == pytest.approx(value, rel=1e-12), name
    decayed = {"head.weight", "backbone.blocks.1.attn.qkv.weight", "backbone.patch_embed.proj.weight"}
    for name in expected_lr:
        assert wd[name] == (0.05 if name in decayed else 0.0), name
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lr)
    assert "backbone.mask_token" not in lr  # masked pretraining's token: no gradient here (DDP)
    # the head-only epochs: the backbone's groups get lr 0, the head keeps its own
    apply_schedule(optimizer, {**values, "backbone_lr_factor": 0.0})
    for group in optimizer.param_groups:
        assert group["lr"] == (0.0 if group["is_backbone"] else pytest.approx(0.1))


# ---------------------------------------------------------------------------------------------- learning
def test_fine_tuning_learns_what_a_head_on_the_frozen_backbone_does_not(data, tmp_path):
    """A random backbone's features barely tell the tints apart (LayerScale 1e-5: the blocks add almost
    nothing to the CLS token); fine-tuned, it learns them."""
    tuned = run(data, tmp_path / "tuned", epochs=5, lr=0.2)
    frozen = run(data, tmp_path / "frozen", epochs=5, lr=0.2, freeze_backbone_epochs=5)
    assert tuned["top1"] >= 90.0
    assert tuned["top1"] >= frozen["top1"] + 30.0
    assert frozen["history"][-1]["backbone_frozen"] and not tuned["history"][-1]["backbone_frozen"]


def test_backbone_unchanged_during_the_head_only_epochs_and_changed_after(data, tmp_path):
    out = tmp_path / "run"
    result = run(data, out, epochs=2, freeze_backbone_epochs=1, keep_checkpoints=0, lr=0.1)
    start, _ = load_backbone("random:vit_nano_p2", "cpu", seed=0)
    first, last = (load_checkpoint(p)["model"] for p in list_checkpoints(out / "checkpoints"))
    torch.manual_seed(0)  # the head's initialisation, as the run makes it (seed=0)
    initial_head = Classifier(create_model("vit_nano_p2"), 3).head
    for name, tensor in start.state_dict().items():
        assert torch.equal(first[f"backbone.{name}"], tensor), name
    assert not torch.equal(first["head.weight"], initial_head.weight)
    changed = [n for n, t in start.state_dict().items() if not torch.equal(last[f"backbone.{n}"], t)]
    assert "blocks.1.attn.qkv.weight" in changed and "patch_embed.proj.weight" in changed
    assert [h["backbone_frozen"] for h in result["history"]] == [True, False]


# ---------------------------------------------------------------------------------------------- resume
def ctrl_c_after_step_4(monkeypatch):
    """Make the next run of Finetuner send this process SIGINT (a Ctrl-C) as it starts step 4 (iteration
    3), so that it stops with a checkpoint after that step; returns the plain step, to put back."""
    step = Finetuner.step

    def interrupting_step(self, *args):
        if self.iteration == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, *args)

    monkeypatch.setattr(Finetuner, "step", interrupting_step)
    return step


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(data, finished, tmp_path, monkeypatch):
    """SIGINT in the middle of epoch 1 (after step 4 of 12): the run stops with a checkpoint there, and
    resume=true ends with exactly the parameters, history and result of the uninterrupted run."""
    out = tmp_path / "interrupted"
    step = ctrl_c_after_step_4(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(data, out, epochs=2, lr=0.1)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint_00000004.pt"]
    monkeypatch.setattr(Finetuner, "step", step)
    with pytest.raises(DinokitError, match="already holds a run"):
        run(data, out, epochs=2, lr=0.1)
    with pytest.raises(DinokitError, match="lr"):
        run(data, out, epochs=2, lr=0.2, resume=True)
    resumed = json.loads(Path(finetune(out=str(out), resume=True)).read_text())  # the saved keys: none given
    whole = json.loads((finished / "finetune.json").read_text())
    assert [without_minutes(h) for h in resumed["history"]] == [without_minutes(h) for h in whole["history"]]
    a, b = (load_checkpoint(list_checkpoints(o / "checkpoints")[-1]) for o in (finished, out))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert resumed["fine_tuned_weights_hash"] == whole["fine_tuned_weights_hash"]


def test_activation_checkpointing_trains_the_same_and_may_change_on_resume(data, finished, tmp_path, monkeypatch):
    """activation_checkpointing=true recomputes the blocks in the backward of each step (2 checkpointed
    block calls a step; none in the val passes, which run without gradients) and changes nothing else:
    checkpointed until a Ctrl-C after step 4 and resumed without it, the run ends with the history,
    parameters (keys and values) and fine-tuned weights of the uninterrupted plain run (stochastic
    depth 0.1, fp32)."""
    from dinokit.models.layers import block

    calls = []
    checkpoint = block.checkpoint
    monkeypatch.setattr(block, "checkpoint", lambda *args, **kw: calls.append(1) or checkpoint(*args, **kw))
    out = tmp_path / "switched"
    step = ctrl_c_after_step_4(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(data, out, epochs=2, lr=0.1, activation_checkpointing=True)
    assert len(calls) == 4 * 2
    monkeypatch.setattr(Finetuner, "step", step)
    resumed = json.loads(Path(finetune(out=str(out), resume=True, activation_checkpointing=False)).read_text())
    assert len(calls) == 4 * 2
    whole = json.loads((finished / "finetune.json").read_text())
    assert [without_minutes(h) for h in resumed["history"]] == [without_minutes(h) for h in whole["history"]]
    a, b = (load_checkpoint(list_checkpoints(o / "checkpoints")[-1])["model"] for o in (finished, out))
    assert list(a) == list(b) and all(torch.equal(a[name], b[name]) for name in a)
    assert resumed["fine_tuned_weights_hash"] == whole["fine_tuned_weights_hash"]


def test_a_sigterm_repeated_while_the_stop_checkpoint_is_written_is_ignored(data, tmp_path, monkeypatch):
    """As in pretraining (tests/test_pretrain.py): the same stop delivered again while the stopped run
    writes its checkpoint does not act. The handler in place before the run records whether it did."""
    module = importlib.import_module("dinokit.train.finetune")
    acted = []
    before = signal.signal(signal.SIGTERM, lambda *_: acted.append(1))
    try:
        step, save = Finetuner.step, module.save_checkpoint

        def stopping_step(self, *args):
            if self.iteration == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # the stop
            return step(self, *args)

        def save_with_the_stop_again(folder, iteration, *args):
            os.kill(os.getpid(), signal.SIGTERM)  # the same stop, delivered again during the save
            time.sleep(0.01)  # the handler runs between bytecodes
            return save(folder, iteration, *args)

        monkeypatch.setattr(Finetuner, "step", stopping_step)
        monkeypatch.setattr(module, "save_checkpoint", save_with_the_stop_again)
        with pytest.raises(SystemExit) as exit_:
            run(data, tmp_path / "run", epochs=2, lr=0.1)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert exit_.value.code == 143 and acted == []
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint_00000004.pt"]


def test_a_run_stopped_by_sigterm_that_then_fails_gives_the_signal_handlers_back(data, tmp_path, monkeypatch):
    """As in pretraining (tests/test_pretrain.py): a stopped run that fails before its last checkpoint
    (closing metrics.jsonl on a full disk) gives the SIGINT / SIGTERM handlers back."""
    from dinokit.train.metrics_log import MetricsLog

    step = Finetuner.step

    def stopping_step(self, *args):
        if self.iteration == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the stop
        return step(self, *args)

    def close_on_a_full_disk(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Finetuner, "step", stopping_step)
    monkeypatch.setattr(MetricsLog, "close", close_on_a_full_disk)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(OSError, match="No space left on device"):
            run(data, tmp_path / "run", epochs=2, lr=0.1)
        after = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert after == before


def test_ctrl_c_acts_at_once_during_the_stop_checkpoint_of_a_process_stopped_by_another(data, tmp_path, monkeypatch):
    """As in pretraining (tests/test_pretrain.py): stopped because another process was signalled (its
    stop check, one sum over the processes, says so after the step of iteration 3), a process keeps
    SIGTERM handled through its stop checkpoint while Ctrl-C acts at once."""
    from dinokit import distributed

    module = importlib.import_module("dinokit.train.finetune")
    step, save, all_reduce_sum = Finetuner.step, module.save_checkpoint, distributed.all_reduce_sum
    stop_elsewhere = []

    def stepping(self, *args):
        out = step(self, *args)
        stop_elsewhere.extend([True] if self.iteration == 3 else [])
        return out

    def summed(tensor):  # the next one-number sum, the loop's stop check, counts another process's stop
        if stop_elsewhere and tensor.numel() == 1:
            stop_elsewhere.clear()
            return all_reduce_sum(tensor) + 1
        return all_reduce_sum(tensor)

    during_save = []

    def recording_save(*args):
        during_save.append({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
        return save(*args)

    monkeypatch.setattr(Finetuner, "step", stepping)
    monkeypatch.setattr(distributed, "all_reduce_sum", summed)
    monkeypatch.setattr(module, "save_checkpoint", recording_save)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):  # stopped by a signal to another process
        run(data, tmp_path / "run", epochs=2, lr=0.1)
    assert {s: signal.getsignal(s) for s in before} == before
    (last,) = during_save
    assert last[signal.SIGINT] == before[signal.SIGINT]  # Ctrl-C: as usual
    assert last[signal.SIGTERM] != before[signal.SIGTERM]  # SIGTERM: still the stop's handler
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint_00000004.pt"]


# ---------------------------------------------------------------------------------------------- outputs
def test_backbone_and_head_files_reproduce_the_model_and_its_val_accuracy(data, finished, tmp_path):
    result = json.loads((finished / "finetune.json").read_text())
    final = load_checkpoint(list_checkpoints(finished / "checkpoints")[-1])["model"]
    trained = Classifier(create_model("vit_nano_p2"), 3)
    trained.load_state_dict(final)
    trained.eval()
    loaded = dinokit.load_model(finished / "backbone.safetensors")
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), trained.backbone(images))
    # the head file: metadata of the fine-tuned backbone, accepted by predict's backbone check
    state, meta = load_head_file(finished / "classifier.safetensors", task="classification")
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (3, 32) and state["bias"].shape == (3,)
    assert meta["model"] == str((finished / "backbone.safetensors").resolve())
    assert meta["weights_hash"] == weights_hash(loaded) == result["fine_tuned_weights_hash"]
    assert (meta["classes"], meta["layers"], meta["n_last_blocks"], meta["avgpool"]) == (
        ["blue", "green", "red"],
        [1],
        1,
        False,
    )
    assert meta["image_size"] == 16 and meta["norm"] is True and meta["resize_policy"] == "center_crop"
    backbone = backbone_for_head(meta, None, "cpu")
    # the head on the backbone's features of val, in the eval transform: finetune.json's top-1
    paths = list_images(data / "val")
    labels = torch.tensor([meta["classes"].index(p.parent.name) for p in paths])
    transform = make_transform(meta["image_size"], meta["resize_policy"])
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        feats = compute_features(backbone.model, batch, ("cls", "patch_mean"))
    x = linear_input(feats["cls"].unsqueeze(1), feats["patch_mean"], meta["n_last_blocks"], meta["avgpool"])
    logits = x @ state["weight"].T + state["bias"]
    top1 = 100.0 * int((logits.argmax(1) == labels).sum()) / len(labels)
    assert top1 == pytest.approx(result["top1"], abs=1e-9)
    # and as `dinokit predict classification` applies it (from the out folder, by the metadata alone)
    predicted = tmp_path / "predictions.json"
    predict_classification(str(finished), str(data / "val"), str(predicted), k=1, precision="fp32", num_workers=0)
    rows = {Path(r["path"]).resolve(): r["predictions"][0]["class"] for r in json.loads(predicted.read_text())}
    hits = sum(rows[p.resolve()] == p.parent.name for p in paths)
    assert 100.0 * hits / len(paths) == pytest.approx(result["top1"], abs=1e-9)
    assert result["train_images"] == 96 and result["val_images"] == 24 and result["bad_files"] == []
    assert result["protocol"]["weights_hash"] == weights_hash(load_backbone("random:vit_nano_p2", "cpu", 0)[0])
    assert len(result["history"]) == 2 and (finished / "metrics.jsonl").exists()
    assert (finished / "config.yaml").exists()


def test_unreadable_files_skipped_and_counted_with_every_option_on(tmp_path):
    """bf16, avgpool, MixUp + CutMix, RandAugment and clipping together, on folders with a broken file."""
    root = colour_images(tmp_path / "d", {"train": 8, "val": 4})
    (root / "train" / "red" / "broken.png").write_bytes(b"not a png")
    (root / "val" / "blue" / "broken.png").write_bytes(b"")
    keys = dict(precision="bf16", avgpool=True, mixup=0.8, cutmix=1.0, rand_augment=9, clip_grad=1.0)
    result = run(root, tmp_path / "run", epochs=1, **keys)
    assert (result["train_bad_files"], result["val_bad_files"]) == (1, 1)
    assert (result["train_images"], result["val_images"]) == (24, 12)
    assert np.isfinite(result["history"][0]["train_loss"]) and "RandAugment" in result["protocol"]["train_transform"]
    assert "MixUp" in result["protocol"]["targets"] and "CutMix" in result["protocol"]["targets"]
    state, meta = load_head_file(tmp_path / "run" / "classifier.safetensors", task="classification")
    assert state["weight"].shape == (3, 64) and meta["avgpool"] is True


def test_soft_targets_smooth_one_hot_labels_and_mix_pairs():
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 2, 1, 2])
    _, targets = SoftTargets(3, smoothing=0.3)(images, labels)
    assert torch.allclose(targets, torch.nn.functional.one_hot(labels, 3) * 0.7 + 0.1)
    mixed, targets = SoftTargets(3, mixup=1.0, smoothing=0.0)(images, labels)
    assert torch.allclose(targets.sum(1), torch.ones(4)) and not torch.equal(mixed, images)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_input_is_refused_with_a_clear_message(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DinokitError, match="share"):
        finetune(train=str(data / "train"), val=str(data / "train"), out=str(out), **TINY)
    single = tmp_path / "single"
    (single / "red").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(single / "red" / "a.png")
    with pytest.raises(DinokitError, match="one class"):
        finetune(train=str(single), val=str(data / "val"), out=str(out), **TINY)
    with pytest.raises(DinokitError, match="not a multiple of the patch size 2"):
        run(data, out, image_size=15)
    with pytest.raises(DinokitError, match=r"unknown fine-tuning key.*'layer_decy' \(did you mean layer_decay"):
        run(data, out, layer_decy=0.5)
    with pytest.raises(DinokitError, match=r"missing required key.*model="):
        finetune(train=str(data / "train"), val=str(data / "val"), out=str(out))
    with pytest.raises(DinokitError, match="batch_size"):
        run(data, out, batch_size=128)  # more than the 96 train images
    with folder_lock(out, "a test"), pytest.raises(DinokitError, match="another process is writing"):
        run(data, out)
    assert cli_run(["finetune", f"train={data / 'train'}", "val=x", f"out={out}", "layer_decy=0.5"]) == 2
    assert not (out / "config.yaml").exists()


def test_a_missing_key_names_the_help_page(tmp_path, capsys):
    """'missing required key(s): model=...' did not say where the keys are explained, as the CLI's own
    message for the other commands does (model, train and val are optional arguments of `finetune`,
    so FinetuneConfig's check says it)."""
    assert cli_run(["finetune", "train=t", f"out={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == (
        "dinokit: error: missing required key(s): model=..., val=... "
        "(`dinokit finetune --help` says what each key is)\n"
    )
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- torchrun
def test_torchrun_two_processes_match_one_process_on_the_same_global_batch(data, tmp_path):
    """2 processes x batch 4 read the same stream positions, augmentations and mean loss as 1 x 8:
    without stochastic depth (whose draws are per process) the results agree up to float rounding, in
    the head-only epoch (gradients averaged by hand) and the fine-tuning one (DDP)."""
    keys = {**TINY, "batch_size": 4, "drop_path_rate": 0.0, "epochs": 2, "freeze_backbone_epochs": 1, "lr": 0.1}
    args = [f"train={data / 'train'}", f"val={data / 'val'}", f"out={tmp_path / 'ddp'}"]
    args += [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in keys.items()]
    done = run_torchrun(["-m", "dinokit", "finetune", *args], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("finetune.json") == 1  # the result, printed by process 0 alone
    ddp = json.loads((tmp_path / "ddp" / "finetune.json").read_text())
    one = run(data, tmp_path / "one", **{**keys, "batch_size": 8})
    assert ddp["protocol"]["processes"] == 2 and ddp["protocol"]["global_batch"] == 8
    assert [h["val_top1"] for h in ddp["history"]] == [h["val_top1"] for h in one["history"]]
    for a, b in zip(ddp["history"], one["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    a, b = (dinokit.load_model(tmp_path / o / "backbone.safetensors").state_dict() for o in ("ddp", "one"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4)


def test_finetuning_decodes_large_jpegs_at_a_scale_no_crop_upsamples():
    """The train transform starts with ReducedJpegDecode at crops_min_side of its RandomResizedCrop
    (224 px from 8%: 224 / sqrt(0.08 * 3/4) = 914.5 -> 915), the val transform at twice its resize;
    reduced_decode=False decodes whole."""
    from dinokit.data.finetune_augmentation import train_transform
    from dinokit.data.images import decode_min_side
    from dinokit.eval.common import make_transform

    assert decode_min_side(train_transform(224, (0.08, 1.0), reduced_decode=True)) == 915
    assert decode_min_side(train_transform(224, (0.08, 1.0))) is None
    assert decode_min_side(make_transform(224)) == 512
    assert decode_min_side(make_transform(224, reduced_decode=False)) is None
