"""Review of pretraining: bad values refused up front, resume with another batch size, edge cases."""

import re

import pytest

from dinokit.errors import DinokitError
from dinokit.train.config import resolve_config

# Each value was accepted and then crashed the run with a bare traceback (IndexError, ValueError,
# ZeroDivisionError, RuntimeError from torchvision or NumPy) or silently trained on nonsense
# (a temperature of 0 gives NaN losses; checkpoint_every=-1 saved every iteration).
BAD_VALUES = [
    ("mask_sample_probability", 1.5, "mask_sample_probability"),
    ("mask_sample_probability", -0.5, "mask_sample_probability"),
    ("mask_ratio_min_max", [0.5, 0.1], "mask_ratio_min_max"),
    ("mask_ratio_min_max", [0.1, 1.5], "mask_ratio_min_max"),
    ("color_jitter", [0.4], "color_jitter"),
    ("color_jitter", [0.4, 0.4, 0.2, 0.8], "color_jitter"),
    ("color_jitter", [-0.1, 0.4, 0.2, 0.1], "color_jitter"),
    ("global_crops_scale", [0.5], "global_crops_scale"),
    ("local_crops_scale", [0.4, 0.05], "local_crops_scale"),
    ("global_crops_scale", [0.0, 1.0], "global_crops_scale"),
    ("adamw_betas", [0.9], "adamw_betas"),
    ("adamw_betas", [0.9, 1.0], "adamw_betas"),
    ("blur_sigma", [0.1], "blur_sigma"),
    ("blur_sigma", [2.0, 0.1], "blur_sigma"),
    ("blur_probabilities", [1.0, 0.1, 1.5], "blur_probabilities"),
    ("solarize_probability", 1.2, "solarize_probability"),
    ("color_jitter_probability", -0.1, "color_jitter_probability"),
    ("grayscale_probability", 2.0, "grayscale_probability"),
    ("teacher_temp", 0.0, "teacher_temp"),
    ("teacher_temp_start", -0.04, "teacher_temp_start"),
    ("student_temp", 0.0, "student_temp"),
    ("momentum_teacher", 1.5, "momentum_teacher"),
    ("momentum_teacher_end", -0.1, "momentum_teacher_end"),
    ("center_momentum", 1.1, "center_momentum"),
    ("head_prototypes", 0, "head_prototypes"),
    ("head_nlayers", 0, "head_nlayers"),
    ("ibot_prototypes", 0, "ibot_prototypes"),
    ("log_every", 0, "log_every"),
    ("checkpoint_every", -1, "checkpoint_every"),
    ("checkpoint_every_minutes", -1.0, "checkpoint_every_minutes"),
    ("keep_checkpoints", -1, "keep_checkpoints"),
    ("nan_patience", 0, "nan_patience"),
    ("freeze_last_layer", 1.5, "freeze_last_layer"),
    ("freeze_backbone", -0.1, "freeze_backbone"),
    ("drop_path_rate", 1.0, "drop_path_rate"),
    ("batched_image_size", -1, "batched_image_size"),
    ("lr", -0.1, "lr"),
    ("seed", -1, "seed"),  # NumPy's SeedSequence, which seeds the crops and masks, takes no negative numbers
]


@pytest.mark.parametrize("key, value, named", BAD_VALUES)
def test_bad_values_are_refused_with_the_key_named(key, value, named):
    with pytest.raises(DinokitError, match=named):
        resolve_config("dinov2_vits14", {key: value})


def test_every_shipped_preset_passes_the_checks():
    from dinokit.train.config import list_presets

    for preset in list_presets():
        resolve_config(preset, {})


def test_resume_with_another_batch_size_finishes_the_epochs_and_continues_the_schedules(tmp_path):
    """epochs=2 of 32 images at batch 8 is 64 images; stopped after 4 iterations (32 images) and resumed
    with batch_size=16, the run saw 1 epoch and stopped at once: the schedule was recomputed as 4
    iterations of 16 and iteration 4 had 'reached' it. It now sees the other 32 images in 2 batches
    of 16, and its schedules go on from the images seen (progress 48 / 64 at the second of them)."""
    import math

    from pretrain_helpers import TINY, tiny_images

    import dinokit
    from dinokit.train.checkpoint import list_checkpoints, load_checkpoint
    from dinokit.train.metrics_log import read_metrics
    from dinokit.train.schedules import cosine

    data, out = tiny_images(tmp_path / "data"), tmp_path / "run"
    dinokit.pretrain(data=str(data), out=str(out), **{**TINY, "epochs": 2.0, "max_iterations": 4})
    summary = dinokit.pretrain(
        data=str(data), out=str(out), **{**TINY, "epochs": 2.0, "max_iterations": 0, "batch_size": 16, "resume": True}
    )
    assert summary["epochs"] == 2.0 and summary["iterations"] == 6
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1])["samples_seen"] == 64
    row = read_metrics(out / "metrics.jsonl")[-1]
    assert row["iteration"] == 6
    assert math.isclose(row["momentum"], cosine(0.992, 1.0, 48 / 64), rel_tol=1e-12)


def test_the_uniform_collapse_is_warned_about(tmp_path):
    """DINO collapses two ways: every image on one prototype (caught) or every image's targets
    uniform (docs/benchmarks.md: the first cpu32 drifted into it, teacher entropy 0.998 of log K).
    The second gives KL to uniform 0 and may keep the CLS spread, and was never warned about."""
    import torch
    from pretrain_helpers import TINY, tiny_images

    from dinokit.train.pretrain import Trainer
    from dinokit.train.self_distillation import collapse_figures

    keys = {k: v for k, v in TINY.items() if k != "preset"}
    cfg = resolve_config(TINY["preset"], {**keys, "max_iterations": 100})
    trainer = Trainer(cfg, str(tiny_images(tmp_path / "data")), tmp_path / "run", None, torch.device("cpu"), False)
    trainer.iteration = 50
    uniform = collapse_figures(torch.full((4, 8), 1 / 8), torch.eye(4, 6))
    assert uniform["teacher_kl_uniform"] < 1e-6 and uniform["cls_spread"] > 0.5
    with pytest.warns(UserWarning, match=r"possible collapse: teacher targets nearly uniform .*entropy 1.000"):
        assert trainer.warn_collapse({"iteration": 50, "minutes": 1.0, **uniform}, False) is True


def test_batched_memory_check_counts_every_process_on_the_machine(tmp_path, monkeypatch):
    """augmentation=batched holds the decoded images in every process: under torchrun, 8 processes
    whose copies each take 30% of the memory passed the 'half of this machine' check one by one and
    were then killed by the kernel; the check now counts the processes on this machine."""
    import os

    from pretrain_helpers import tiny_images

    from dinokit.data.images import list_images
    from dinokit.data.unlabelled import decode_to_memory

    paths = list_images(str(tiny_images(tmp_path / "data")))[:4]  # 4 x 3 x 16 x 16 = 3072 bytes
    real_sysconf = os.sysconf
    monkeypatch.setattr(
        os, "sysconf", lambda name: {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": 8000}.get(name) or real_sysconf(name)
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    images, bad = decode_to_memory(paths, 16)
    assert images.shape == (4, 3, 16, 16) and bad == []
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(DinokitError, match="2 processes"):
        decode_to_memory(paths, 16)


def test_a_run_started_from_init_resumes_without_its_init_weights(tmp_path):
    """resume=true rebuilt the backbone by reading init= again, though the checkpoint holds every
    weight: a run started from a file since moved or deleted (or a released name, offline) could not
    be resumed. The checkpoint now records the backbone's architecture."""
    import shutil

    from pretrain_helpers import TINY, tiny_images

    import dinokit

    data = tiny_images(tmp_path / "data")
    dinokit.pretrain(data=str(data), out=str(tmp_path / "first"), **{**TINY, "max_iterations": 1})
    init = tmp_path / "init.safetensors"
    shutil.copy(tmp_path / "first" / "backbone.safetensors", init)
    keys = {**TINY, "init": str(init)}
    dinokit.pretrain(data=str(data), out=str(tmp_path / "run"), **{**keys, "max_iterations": 2})
    init.unlink()
    summary = dinokit.pretrain(
        data=str(data), out=str(tmp_path / "run"), **{**keys, "max_iterations": 4, "resume": True}
    )
    assert summary["iterations"] == 4


def test_the_advice_after_non_finite_steps_can_be_followed(tmp_path, monkeypatch):
    """The stop message advised 'Lower lr ... or set koleo_loss_weight=0; resume=true continues from the
    last checkpoint', but resume=true refuses a changed lr or koleo_loss_weight (only precision and
    batch_size may change): the message now says which changes a resume takes and which need a new run."""
    from pretrain_helpers import TINY, tiny_images

    import dinokit
    from dinokit.train.self_distillation import SelfDistillation

    data, out = tiny_images(tmp_path / "data"), tmp_path / "run"
    original = SelfDistillation.losses

    def blows_up_after_two(self, *args, **kwargs):
        parts = original(self, *args, **kwargs)
        blows_up_after_two.calls += 1
        if blows_up_after_two.calls > 2:
            parts["loss"] = parts["loss"] * float("inf")
        return parts

    blows_up_after_two.calls = 0
    monkeypatch.setattr(SelfDistillation, "losses", blows_up_after_two)
    keys = {**TINY, "max_iterations": 8, "nan_patience": 2, "checkpoint_every": 2}
    with pytest.raises(DinokitError) as stop:
        dinokit.pretrain(data=str(data), out=str(out), **keys)
    message = str(stop.value)
    assert "resume=true precision=fp32" in message and "new run" in message
    with pytest.raises(DinokitError, match="lr"):  # as the message now says
        dinokit.pretrain(data=str(data), out=str(out), **{**keys, "resume": True, "lr": 0.001})
    monkeypatch.setattr(SelfDistillation, "losses", original)
    summary = dinokit.pretrain(data=str(data), out=str(out), **{**keys, "resume": True, "precision": "fp32"})
    assert summary["iterations"] == 8


@pytest.mark.parametrize("epochs, images, batch, iterations", [(2.2, 25, 1, 55), (1.1, 50, 1, 55), (4.4, 45, 2, 99)])
def test_epochs_give_the_exact_number_of_iterations(epochs, images, batch, iterations):
    """ceil(epochs * images / batch) in floating point: 2.2 * 25 is 55.000000000000007, which ran a 56th
    iteration beyond the requested epochs."""
    from dinokit.train.schedules import run_length

    length = run_length(resolve_config("dinov2_vits14", {"epochs": epochs}), images, batch)
    assert length["stop_iteration"] == length["schedule_iterations"] == iterations
    assert length["schedule_samples"] == iterations * batch


def test_resume_on_other_data_does_not_point_to_a_backbone_the_run_has_not_written(tmp_path):
    """A killed run has checkpoints but no backbone.safetensors (written at the end); resumed on other
    data it was told to start a new run 'with init=<out>/backbone.safetensors', a file that is not there."""
    from pretrain_helpers import TINY, tiny_images

    import dinokit

    out = tmp_path / "run"
    keys = {**TINY, "max_iterations": 2, "checkpoint_every": 1}
    dinokit.pretrain(data=str(tiny_images(tmp_path / "a")), out=str(out), **keys)
    (out / "backbone.safetensors").unlink()  # as a run killed after its checkpoints
    other = tiny_images(tmp_path / "b", per_class=3)
    newest = out / "checkpoints" / "checkpoint_00000002.pt"
    with pytest.raises(DinokitError, match=rf"init={re.escape(str(newest))} \(its teacher"):
        dinokit.pretrain(data=str(other), out=str(out), **{**keys, "max_iterations": 4, "resume": True})
    # the advice works: a new run on the other data starts from the checkpoint's teacher, without
    # finishing the first run
    dinokit.pretrain(data=str(other), out=str(tmp_path / "new"), **{**keys, "init": str(newest)})
    assert (tmp_path / "new" / "backbone.safetensors").is_file()


def test_the_stream_sampler_keeps_a_pass_order_as_a_tensor_not_a_python_list():
    """Each pass's shuffled order was turned into a Python list (36 bytes an image): 500 MB per process
    for ImageNet-22k's 14M images, 5 GB for 142M. It stays an int64 tensor (8 bytes an image, outside
    Python's heap), from which each batch reads its indices."""
    import tracemalloc

    from dinokit.data.unlabelled import StreamBatchSampler

    sampler = StreamBatchSampler(2_000_000, batch_size=4, seed=0)
    tracemalloc.start()
    first = next(iter(sampler))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20, f"{peak / 2**20:.0f} MiB of Python objects for one batch"
    assert [position for _, position in first] == [0, 1, 2, 3]
    assert all(isinstance(index, int) for index, _ in first)


@pytest.mark.parametrize("text", ["", "lr: [0.1\n", "- a list\n"])
def test_a_damaged_config_yaml_is_named_on_resume(tmp_path, text):
    """resume=true reads the run's config.yaml; an emptied or hand-edited one that is not a YAML mapping
    gave yaml's ScannerError or an AttributeError traceback."""
    from pretrain_helpers import TINY, tiny_images

    import dinokit

    out = tmp_path / "run"
    dinokit.pretrain(data=str(tiny_images(tmp_path / "data")), out=str(out), **{**TINY, "max_iterations": 1})
    (out / "config.yaml").write_text(text)
    with pytest.raises(DinokitError, match=r"config\.yaml"):
        dinokit.pretrain(data=str(tmp_path / "data" / "train"), out=str(out), **{**TINY, "resume": True})


def test_a_saved_value_refused_since_is_fixed_by_giving_its_resumable_key(tmp_path):
    """A run started when keep_checkpoints=-1 was accepted (save_checkpoint: keep <= 0 keeps all) could
    not be resumed: its saved config was validated alone, so the fix the error named, keep_checkpoints=0,
    was refused as well. The saved settings with the given keys are what is checked."""
    import yaml
    from pretrain_helpers import TINY, tiny_images

    import dinokit

    out, data = tmp_path / "run", tiny_images(tmp_path / "data")
    keys = {**TINY, "max_iterations": 2, "checkpoint_every": 1}
    dinokit.pretrain(data=str(data), out=str(out), **keys)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**saved, "keep_checkpoints": -1}, sort_keys=False))
    with pytest.raises(DinokitError, match=r"keep_checkpoints must be >= 0 \(0: keep all\), got -1"):
        dinokit.pretrain(data=str(data), out=str(out), **{**keys, "max_iterations": 3, "resume": True})
    resumed = {**keys, "max_iterations": 3, "resume": True, "keep_checkpoints": 0}
    dinokit.pretrain(data=str(data), out=str(out), **resumed)
    assert len(list((out / "checkpoints").glob("checkpoint_*.pt"))) == 3  # 0: every checkpoint kept


def test_an_official_gpu_recipe_on_the_cpu_is_warned_about_once_and_the_cpu_presets_named(tmp_path):
    """`dinokit pretrain` without preset= on a CPU trained the official dinov2_vits14 recipe (224 px crops,
    65536 prototypes, batch 64, 10 workers) silently: 85 s per iteration and 17 GB on a 2-core CPU. A new
    run of an official GPU recipe on the CPU now starts with one warning naming the CPU presets (and
    still runs); a CPU preset, and the resumed run, get none."""
    import warnings

    from pretrain_helpers import run, tiny_images

    data = tiny_images(tmp_path / "data")
    with pytest.warns(UserWarning) as caught:
        summary = run(data, tmp_path / "gpu_recipe", max_iterations=1)  # TINY: dinov2_vits14, tiny overrides
    assert summary["iterations"] == 1
    recipe = [str(w.message) for w in caught if "official GPU recipe" in str(w.message)]
    assert len(recipe) == 1
    assert recipe[0].startswith(
        "preset dinov2_vits14 is an official GPU recipe (224 px crops, 65536 prototypes, batch 64 per process)"
    )
    assert all(f"preset={name}" in recipe[0] for name in ("cpu32", "cpu96", "demo"))
    for keys in (
        dict(out=tmp_path / "gpu_recipe", max_iterations=2, resume=True),
        dict(out=tmp_path / "cpu_preset", preset="cpu32", max_iterations=1),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(data, **keys)
        assert not [w for w in caught if "GPU recipe" in str(w.message)], keys
