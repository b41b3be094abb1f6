"""`dinokit pretrain`: DINO / DINOv2 self-supervised pretraining on any folder of images.

One process on a CPU or GPU, or many with `torchrun --nproc_per_node N -m dinokit pretrain ...`
(DDP; FSDP2 with `fsdp=true`). The run folder `out` receives config.yaml (the full resolved
configuration), checkpoints/, metrics.jsonl, tensorboard/, bad_files.txt (if any) and
backbone.safetensors (the teacher backbone, for `dinokit.load_model`).
"""

import contextlib
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from tqdm import tqdm

from dinokit import distributed as dist
from dinokit.data.images import check_readable, list_images
from dinokit.errors import DinokitError
from dinokit.eval.backbone import weights_hash
from dinokit.eval.knn import knn_top1
from dinokit.io import atomic_write, folder_lock, prepare_output, refuse_other_outputs, write_text
from dinokit.models.architectures import nearest_architecture
from dinokit.runtime import StopSignals, autocast, keeps_global_rng, resolve_device, reuse_freed_memory
from dinokit.train.checkpoint import (
    OBJECTIVE_KEYS,
    RunState,
    export_teacher_backbone,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    model_state,
    optimizer_state,
    read_run,
    rng_state,
    save_checkpoint,
    set_rng_state,
    settings_from_run,
)
from dinokit.train.config import RESUMABLE_KEYS, RUN_FACTS, PretrainConfig, list_presets, resolve_config
from dinokit.train.distillation import (
    SET_BY_DISTILLATION,
    distillation_config,
    every_patch,
    frozen_teacher,
    teacher_centers,
    teacher_checkpoint,
)
from dinokit.train.ema import update_teacher
from dinokit.train.fsdp import local_tensors, reshard_teacher, shard_fsdp
from dinokit.train.metrics_log import MetricsLog, progress_postfix
from dinokit.train.optim import apply_schedule, build_optimizer, clip_gradients, drop_last_layer_gradients, param_groups
from dinokit.train.run_settings import run_settings
from dinokit.train.schedules import run_length
from dinokit.train.self_distillation import Student, collapse_figures

if TYPE_CHECKING:  # the data pipeline (torchvision) is imported where the Trainer builds it: not for `--help`
    from dinokit.data.collate import CropBatch


@keeps_global_rng
def pretrain(
    data: str,
    out: str = "out/pretrain",
    preset: str = "dinov2_vits14",
    max_iterations: int | None = None,
    max_minutes: float | None = None,
    epochs: float | None = None,
    batch_size: int | None = None,
    checkpoint_every: int | None = None,
    num_workers: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    resume: bool = False,
    init: str | None = None,
    **keys,
) -> dict:
    """Self-supervised DINO / DINOv2 pretraining on a folder of images (labels ignored).

    `preset` names a shipped recipe (dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14,
    dino_vits16, dino_vitb16, cpu32, cpu96, demo) or a YAML file; any other key of the config
    (`dinokit.train.config.PretrainConfig`, e.g. lr=, arch=, local_crops_number=) overrides it.
    Length: epochs (real passes), max_iterations and max_minutes (0 = no limit) each stop the run;
    schedules span epochs, else max_iterations, else max_minutes. resume=true continues the run in
    `out` from its newest checkpoint; init= starts from pretrained weights with fresh heads.
    Launch with `torchrun --nproc_per_node N -m dinokit pretrain ...` for several processes.
    Returns a summary (iterations, last metrics, paths) on process 0 and None on the others, as
    `embed` does: the job's result, which the command line prints once.
    """
    given = dict(
        max_iterations=max_iterations,
        max_minutes=max_minutes,
        epochs=epochs,
        batch_size=batch_size,
        checkpoint_every=checkpoint_every,
        num_workers=num_workers,
        device=device,
        precision=precision,
        init=init,
    )
    keys = {**{k: v for k, v in given.items() if v is not None}, **keys}
    out_dir = prepare_output(out, folder=True, create=False)  # a bad out= fails before any work
    refuse_other_outputs(out_dir, ("config.yaml",), "dinokit pretrain")
    # one run per folder: a second one (e.g. resume=true while the first still runs) is refused, as
    # both would write its checkpoints and metrics. Process 0 of torchrun (RANK, before init) holds it.
    main = dist.launched_as_process_0()
    with folder_lock(out_dir, "a pretraining run", wait=False) if main else contextlib.nullcontext():
        cfg, resuming = run_config(out_dir, preset, keys, resume)
        preset = saved_preset(out_dir) if resume and (out_dir / "config.yaml").exists() else preset
        runtime_device = dist.init_distributed(resolve_device(cfg.device))
        # on a CPU, large tensors are made afresh every step: keep freed memory for reuse (runtime.py)
        try:
            with reuse_freed_memory(cfg.reuse_freed_memory and runtime_device.type == "cpu"):
                summary = Trainer(cfg, data, out_dir, preset, runtime_device, resuming, "batch_size" in keys).run()
        except BaseException:
            dist.destroy_distributed(wait=False)  # the others may be in a collective: exit with the error
            raise
        dist.destroy_distributed()
    return summary if main else None


def saved_preset(out: Path) -> str | None:
    """The preset a run's config.yaml records: a resumed run keeps it, whatever preset= says (its
    settings are its config.yaml's), so the file goes on naming the recipe it started from."""
    return yaml.safe_load((out / "config.yaml").read_text()).get("preset")  # read by run_config before


def run_config(out: Path, preset: str | None, keys: dict, resume: bool) -> tuple[PretrainConfig, bool]:
    """The run's configuration, and whether a checkpoint will be resumed (`run_settings`): a new run
    takes `preset` and `keys`; a resumed run its config.yaml, where `keys` may change RESUMABLE_KEYS."""

    def resumable(old: PretrainConfig) -> set[str]:
        # a distilling or continued run takes some keys from the other run, whatever was given (as when it started)
        replaced = SET_BY_DISTILLATION if old.distill_from else OBJECTIVE_KEYS if old.continue_from else ()
        return {*RESUMABLE_KEYS, *replaced}

    return run_settings(
        out,
        keys,
        resume,
        new=lambda values: resolve_config(preset, values),
        # a run saved before reduced_decode existed decoded its JPEGs whole: resumed, it goes on so
        resolve=lambda values, check=True: resolve_config(None, {"reduced_decode": False, **values}, check),
        resumable=resumable,
        facts=RUN_FACTS,
    )


class Trainer:
    """One pretraining run (see `pretrain`)."""

    # ------------------------------------------------------------------------------------ set-up
    def __init__(
        self,
        cfg: PretrainConfig,
        data: str,
        out: Path,
        preset: str | None,
        device: torch.device,
        resuming: bool,
        batch_size_given: bool = False,
    ) -> None:
        from dinokit.train.build import (
            build_augmentation,
            build_collate,
            build_model,
            build_schedules,
            check_crop_sizes,
        )
        from dinokit.train.run_data import (
            check_data_agrees,
            check_same_data,
            data_fingerprint,
            knn_monitor_data,
            make_dataset,
        )

        self.out, self.device = out, device
        self.main = dist.is_main_process()
        world = dist.world_size()
        # an error that every process hits after joining (no images found, a bad crop size...) is printed
        # once, by process 0; one of some processes by each of those (dist.compare_errors)
        with dist.compare_errors():
            self.checkpoint = load_checkpoint(list_checkpoints(out / "checkpoints")[-1]) if resuming else None
            if self.checkpoint is not None and not batch_size_given:  # keep the global batch on any world size
                cfg = self.keep_global_batch(cfg, world)
            cfg, teacher_run, continued = self.read_other_runs(cfg)
            self.cfg = cfg
            self.global_batch = cfg.batch_size * world
            self.paths = list_images(data)
            self.data_fingerprint = data_fingerprint(self.paths, data)
        check_data_agrees(self.data_fingerprint, data)
        with dist.compare_errors():
            if self.checkpoint is not None:
                check_same_data(self.checkpoint, self.data_fingerprint, data, out)
            check_readable(self.paths, data)
            resumed = self.checkpoint or {}
            self.length = run_length(
                cfg, len(self.paths), self.global_batch, resumed.get("iteration", 0), resumed.get("samples_seen", 0)
            )
            torch.manual_seed(cfg.seed)  # the same initial weights in every process
            architecture = continued.vit_config().to_dict() if continued else resumed.get("backbone_config")
            self.model = build_model(cfg, architecture).to(device)
            if continued is not None:  # students, teachers, heads and centers: the whole model state
                self.load_continued(continued)
                del continued
            patch_size = self.model.student.backbone.patch_size
            check_crop_sizes(cfg, patch_size)
            # the k-NN monitor's images, checked before decode_to_memory's minutes (and any step)
            self.knn_data = knn_monitor_data(cfg, patch_size)
            self.use_ibot = self.model.use_ibot
            self.frozen_teacher = None  # distillation's teacher: targets come from it, not the EMA
            if teacher_run is not None:
                self.frozen_teacher = self.build_frozen_teacher(teacher_run)
                del teacher_run  # its whole checkpoint
            masked = self.use_ibot and self.frozen_teacher is None
            self.collate = build_collate(cfg, patch_size, masked)
            self.augmentation = build_augmentation(cfg)
            self.dataset = make_dataset(self.paths, cfg, self.augmentation, self.collate, cfg.progress and self.main)
        self.schedules = build_schedules(cfg, self.global_batch)
        self.iteration, self.samples_seen, self.elapsed = 0, 0, 0.0
        self.counters = {"skipped_steps": 0, "bad_files": 0}
        self.last_knn: float | None = None  # the k-NN monitor's latest top-1
        self.bad_paths: set[str] = set()  # the same on every process, as of the last share_bad_files
        self.unshared_bad: set[str] = set()  # met by this process since then
        if self.checkpoint is not None:  # full model state, before any sharding
            self.resume_from(self.checkpoint)

        if cfg.compile:
            for net in (self.model.student, self.model.teacher):
                for block in net.backbone.blocks:
                    block.compile(dynamic=False)
        self.fsdp = cfg.fsdp and dist.is_distributed()
        self.student = self.spread_over_processes()  # what the step calls: the student, or its DDP wrapper
        # the optimiser is built on the final (possibly sharded) parameters
        groups = param_groups(
            self.model.student.backbone, self.model.student.heads(), cfg.layerwise_decay, cfg.patch_embed_lr_mult
        )
        self.optimizer = build_optimizer(groups, tuple(cfg.adamw_betas))
        if self.checkpoint is not None:
            load_optimizer_state(self.model, self.optimizer, self.checkpoint["optimizer"])
        self.student_params = list(self.model.student.parameters())
        self.teacher_params = list(self.model.teacher.parameters())
        torch.manual_seed(cfg.seed + 1 + dist.rank())  # drop path and other training randomness
        if self.checkpoint is not None and len(self.checkpoint["rng"]) == world:
            set_rng_state(self.checkpoint["rng"][dist.rank()], device)
        self.describe(data, preset)

    def keep_global_batch(self, cfg: PretrainConfig, world: int) -> PretrainConfig:
        """A resumed run keeps its global batch (its stream positions and lr) on any number of processes:
        batch_size becomes saved global batch / processes."""
        saved_global = self.checkpoint["global_batch"]
        if saved_global % world:
            raise DinokitError(
                f"the run's global batch {saved_global} does not divide over {world} processes; "
                "pass batch_size=... explicitly"
            )
        return replace(cfg, batch_size=saved_global // world)

    def read_other_runs(self, cfg: PretrainConfig) -> tuple[PretrainConfig, RunState | None, RunState | None]:
        """(`cfg` with what it takes from another run, distill_from='s teacher run, a new continue_from=
        run): their objective and heads (already so in a resumed config), and for distillation no
        stochastic depth; `self.notes_from_run` says what that changed."""
        teacher_run, continued, self.notes_from_run = None, None, []
        if self.checkpoint is not None and (cfg.continue_from or cfg.distill_from):  # as when it started,
            saved = self.checkpoint["config"]  # whatever is given: the objective it took from the other run
            cfg = replace(cfg, **{key: saved[key] for key in OBJECTIVE_KEYS if key in saved})
        if cfg.distill_from:
            teacher_run = read_run(teacher_checkpoint(cfg.distill_from, self.checkpoint), "distill_from")
            cfg, self.notes_from_run = distillation_config(cfg, teacher_run)
        if cfg.continue_from and self.checkpoint is None:  # a resumed one holds the weights itself
            continued = read_run(cfg.continue_from, "continue_from")
            cfg, self.notes_from_run = settings_from_run(cfg, continued)
        return cfg, teacher_run, continued

    def load_continued(self, run: RunState) -> None:
        """A new continue_from= run's start: the other run's whole model state. A run distilled from
        another (distill_from=) saw no masks, so its backbones have no mask token: masked iBOT starts
        with a fresh one (zeros, as a new backbone's)."""
        fresh = {k: v for k, v in self.model.state_dict().items() if k.endswith("backbone.mask_token")}
        try:
            self.model.load_state_dict({**fresh, **run.state})
        except RuntimeError as e:
            raise DinokitError(
                f"continue_from={self.cfg.continue_from}: its model state does not fit this run's ({e}); a run "
                "continues another with the same objective and heads (they are taken from it), so this is a "
                "checkpoint dinokit cannot read"
            ) from None

    def build_frozen_teacher(self, teacher_run: RunState) -> Student:
        """The distillation teacher on this run's device, checked against the student and, on resume,
        against the teacher the run started with; a new run's EMA centers start from the teacher's."""
        from dinokit.data.transforms import check_image_size

        teacher = frozen_teacher(teacher_run, self.cfg).to(self.device)
        patch, student_patch = teacher.backbone.patch_size, self.model.student.backbone.patch_size
        check_image_size(self.cfg.global_crops_size, patch, name="global_crops_size")  # the teacher sees those
        if self.use_ibot and patch != student_patch:
            raise DinokitError(
                f"distill_from={self.cfg.distill_from}: the teacher's patch size is {patch}, the student's "
                f"{student_patch}; iBOT compares their patches one by one, so they must match (choose an arch "
                "with the teacher's patch size, or ibot_loss_weight=0 to distil the CLS only)"
            )
        self.distill_hash = weights_hash(teacher)
        self.distill_source = str(teacher_run.source.resolve())
        saved = (self.checkpoint or {}).get("distill_teacher_hash")
        if saved is not None and saved != self.distill_hash:
            raise DinokitError(
                f"distill_from={self.cfg.distill_from} now holds another teacher than the one this run started "
                f"with (weights hash {self.distill_hash}, not {saved}): put the teacher checkpoint it started from "
                f"back at {self.checkpoint.get('distill_teacher_checkpoint') or 'its place'}, or start a new run"
            )
        if self.checkpoint is None and self.cfg.centering == "ema":
            self.model.load_state_dict(teacher_centers(teacher_run), strict=False)
        return teacher

    def resume_from(self, checkpoint: dict) -> None:
        """Where the checkpoint left the run: the full model state (loaded before any sharding), the
        iteration, images seen, clock, counters and the unreadable files met (not counted again)."""
        self.model.load_state_dict(checkpoint["model"])
        self.iteration = checkpoint["iteration"]
        self.samples_seen = checkpoint["samples_seen"]
        self.elapsed = checkpoint["elapsed_seconds"]
        self.counters = dict(checkpoint["counters"])
        self.bad_paths = set(checkpoint.get("bad_files", []))
        self.counters["bad_files"] = max(self.counters["bad_files"], len(self.bad_paths))

    def spread_over_processes(self) -> torch.nn.Module:
        """Under torchrun, FSDP2 shards the model in place (fsdp=true) or DDP wraps the student; returns
        what the step calls: the student, or its DDP wrapper."""
        if self.fsdp:
            shard_fsdp(self.model)
        elif dist.is_distributed():
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(
                self.model.student, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True
            )
        return self.model.student

    def describe(self, data: str, preset: str | None) -> None:
        cfg, n = self.cfg, len(self.paths)
        derived = {
            "files": n,
            "processes": dist.world_size(),
            "global_batch": self.global_batch,
            "iterations_per_epoch": round(self.length["iterations_per_epoch"], 3),
            "schedule_iterations": self.length["schedule_iterations"],
            "peak_lr": self.schedules.lr,
            "augmentation": repr(self.augmentation),
        }
        if cfg.init or cfg.continue_from:  # the architecture comes from the weights; `arch` is not used
            c = self.model.student.backbone.config
            derived["backbone"] = (
                f"from {'init' if cfg.init else 'continue_from'}: {c.embed_dim} wide, {c.depth} blocks, "
                f"{c.num_heads} heads, patch {c.patch_size}, {c.num_register_tokens} registers "
                f"(nearest named: {nearest_architecture(c)})"
            )
        if cfg.distill_from:
            derived["distillation"] = (
                f"frozen teacher of {cfg.distill_from} ({self.frozen_teacher.backbone.embed_dim} wide, "
                f"{len(self.frozen_teacher.backbone.blocks)} blocks); from it: "
                + (", ".join(self.notes_from_run) or "the same objective and heads")
            )
        if cfg.continue_from:
            derived["continued"] = (
                f"students, teachers, heads and centers of {cfg.continue_from}, not its optimiser, schedules nor "
                "data position; from it: " + (", ".join(self.notes_from_run) or "the same objective and heads")
            )
        self.derived = derived
        with dist.compare_errors():  # process 0 writes, the others wait (as in `save`)
            if self.main:
                self.out.mkdir(parents=True, exist_ok=True)
                text = yaml.safe_dump(
                    {"data": str(data), "out": str(self.out), "preset": preset, "derived": derived, **cfg.to_dict()},
                    sort_keys=False,
                )
                atomic_write(self.out / "config.yaml", lambda tmp: Path(tmp).write_text(text))
        if not self.main:
            return
        length = self.length["schedule_iterations"]
        span = f"{length} iterations" if length else f"{cfg.max_minutes} minutes"
        epochs = f" = {cfg.epochs} epochs" if cfg.epochs else ""
        print(
            f"pretrain: {self.files_found()}, {dist.world_size()} process(es) x batch {cfg.batch_size} = "
            f"{self.global_batch} ({derived['iterations_per_epoch']} iterations per epoch); "
            f"schedule over {span}{epochs}; {cfg.objective} {cfg.init or cfg.continue_from or cfg.arch} "
            f"on {self.device}, {cfg.precision}"
        )
        if self.checkpoint is None:
            self.warn_gpu_recipe_on_cpu(preset)
        if cfg.init or cfg.continue_from:
            key = f"init={cfg.init}" if cfg.init else f"continue_from={cfg.continue_from}"
            print(f"pretrain: {key} sets the architecture ({derived['backbone']}); arch={cfg.arch} is unused")
        if cfg.continue_from:
            print(f"pretrain: continuing from the {derived['continued']}")
        if cfg.distill_from:
            print(f"pretrain: distilling from the {derived['distillation']}; the final model is the student's EMA")

    def warn_gpu_recipe_on_cpu(self, preset: str | None) -> None:
        """A new run of an official GPU recipe (the dinov2_* and dino_vit* presets: 224 px crops, 65536
        prototypes) on the CPU is warned of, not refused, with the CPU presets named. A resumed run is
        not: its settings are its config.yaml's, whatever preset= says."""
        official = preset in list_presets() and preset.startswith(("dinov2_", "dino_vit"))
        if self.device.type != "cpu" or not official:
            return
        recipe = resolve_config(preset, {})
        warnings.warn(
            f"preset {preset} is an official GPU recipe ({recipe.global_crops_size} px crops, "
            f"{recipe.head_prototypes} prototypes, batch {recipe.batch_size} per process): on a CPU one step can "
            "take tens of seconds and several GB of memory (bench/train_throughput.py, docs/benchmarks.md). "
            "For a CPU, pick one of the CPU presets: preset=cpu32 "
            "(32 px images, e.g. CIFAR), preset=cpu96 (64-96 px images) or preset=demo, e.g. `dinokit pretrain "
            "data=... preset=cpu32 max_minutes=15`",
            stacklevel=1,
        )

    def files_found(self) -> str:
        """The data as known before training: the files listed, and (augmentation=batched, which has
        decoded them all) how many are unreadable; the per-image path meets those during training
        (`write_bad_files`), as a full scan of a large dataset up front would be slow."""
        from dinokit.data.unlabelled import InMemoryMultiCrops

        n = len(self.paths)
        if isinstance(self.dataset, InMemoryMultiCrops):
            return f"{n} files found, {len(self.dataset.bad)} unreadable file(s) skipped"
        return f"{n} files found (unreadable ones are skipped when met and listed at the end)"

    # ------------------------------------------------------------------------------------ step
    def step(self, batch: "CropBatch", values: dict) -> tuple[dict, dict, bool, float]:
        """One optimisation step; returns (loss parts, the teacher's CLS features and probabilities,
        accepted, grad norm).

        Neither the teacher's nor the student's logits (M x K each) are kept through the backward
        beyond what autograd saves: the centers need only their row sums, the log only the CLS rows.
        """
        cfg = self.cfg
        apply_schedule(self.optimizer, values)
        batch = batch.to(self.device)
        n_global = cfg.global_crops_number
        masks, mask_weights = batch.masks, batch.mask_weights
        if self.frozen_teacher is not None and self.use_ibot:  # distillation: iBOT on every patch, unmasked
            masks, mask_weights = every_patch(batch.global_crops, self.model.student.backbone.patch_size)
        with autocast(self.device, cfg.precision):
            teacher = self.model.teacher_outputs(batch.global_crops, masks, self.frozen_teacher)
            if self.fsdp and self.frozen_teacher is None:  # see reshard_teacher
                reshard_teacher(self.model)
            targets = self.model.teacher_probabilities(teacher, values["teacher_temp"])
            center_statistics = self.model.center_statistics(teacher)
            logged = {"cls": teacher["cls"], "cls_probs": targets["cls_logits"]}
            del teacher
            student = self.student(batch.global_crops, batch.local_crops, masks, self.frozen_teacher is None)
            parts = self.model.losses(student, targets, n_global, mask_weights)
            del student, targets
        parts["loss"].backward()
        heads = self.model.student.heads().values()
        grad_norm = clip_gradients([self.model.student.backbone, *heads], cfg.clip_grad, cfg.clip_grad_per)
        if cfg.freeze_last_layer_by == "gradient" and values["last_layer_frozen"]:
            drop_last_layer_gradients(self.optimizer)  # after clipping, as DINO v1
        finite = torch.tensor([float(torch.isfinite(parts["loss"]).item() and math.isfinite(float(grad_norm)))])
        accepted = bool(-dist.all_reduce_max(-finite).item())  # all processes agree
        if accepted:
            self.optimizer.step()
            self.model.update_centers(center_statistics)
            update_teacher(local_tensors(self.teacher_params), local_tensors(self.student_params), values["momentum"])
        self.optimizer.zero_grad(set_to_none=True)
        return parts, logged, accepted, float(grad_norm)

    # ------------------------------------------------------------------------------------ run loop
    def run(self) -> dict:
        from dinokit.train.run_data import make_loader

        cfg = self.cfg
        log = None
        with dist.compare_errors():  # process 0 opens (on resume: rewrites) metrics.jsonl, the others wait
            if self.main:
                log = MetricsLog(self.out, cfg.tensorboard, self.iteration)
        loader = make_loader(self.dataset, cfg, cfg.batch_size, self.samples_seen, self.device, self.collate)
        self.model.train()
        total = self.length["stop_iteration"]
        bar = tqdm(
            total=total, initial=self.iteration, desc="pretrain", unit="it", disable=not (cfg.progress and self.main)
        )
        start = time.perf_counter() - self.elapsed
        last_save_time = time.perf_counter()
        window = {"time": 0.0, "wait": 0.0, "images": 0, "steps": 0}
        consecutive_bad = 0
        warned_collapse = False
        last_row: dict = {}
        elapsed = self.elapsed
        parts = None
        stopped_by = None
        # the handlers: Ctrl-C's given back after the loop, SIGTERM's after the last checkpoint (a repeated
        # SIGTERM is the same stop, ignored until it is written); leaving the block restores every one
        with StopSignals() as stop:
            try:
                iterator = iter(loader)  # the loader's workers ignore both signals (ignore_stop_signals)
                while True:
                    elapsed, stop_requested = self.shared_clock(start, stop.requested is not None)
                    if stop_requested:  # Ctrl-C or SIGTERM on some process: every process stops here
                        stopped_by = stop.requested or "a signal to another process"
                        break
                    if self.should_stop(elapsed):
                        break
                    t0 = time.perf_counter()
                    batch = next(iterator)
                    t1 = time.perf_counter()
                    self.record_bad(batch)
                    # a batch of unreadable files on some process: no step anywhere, but the iteration's
                    # bookkeeping (bar, metrics row, checkpoint due) as after a step
                    empty = dist.all_reduce_sum(torch.tensor([float(batch.batch_size == 0)])).item() > 0
                    if not empty:
                        values = self.schedules(self.progress(elapsed))
                        parts, teacher, accepted, grad_norm = self.step(batch, values)
                        if accepted:
                            consecutive_bad = 0
                        else:
                            consecutive_bad += 1
                            self.skip_step(consecutive_bad)
                    self.iteration += 1
                    self.samples_seen += self.global_batch
                    if not empty:
                        t2 = time.perf_counter()
                        window["time"] += t2 - t0
                        window["wait"] += t1 - t0
                        window["images"] += self.global_batch
                        window["steps"] += 1
                    bar.update(1)

                    # a row every log_every iterations and at the last one (stop_iteration, None for a run of
                    # max_minutes); its losses are its window's last step's: a window of empty batches has none
                    log_due = self.iteration % cfg.log_every == 0 or self.iteration == self.length["stop_iteration"]
                    if log_due and window["steps"]:
                        row = self.metrics_row(parts, teacher, values, grad_norm, window, elapsed)
                        window = {"time": 0.0, "wait": 0.0, "images": 0, "steps": 0}
                        last_row = row
                        with dist.compare_errors():  # process 0 writes, the others wait (as in `save`)
                            if self.main:
                                log.write(row)
                                bar.set_postfix(progress_postfix(row))
                                warned_collapse = self.warn_collapse(row, warned_collapse)
                    if cfg.knn_every and self.iteration % cfg.knn_every == 0:
                        start += self.log_knn(log, bar)  # its minutes are not training's: out of the time budget
                    if self.checkpoint_due(last_save_time):
                        self.save(elapsed)
                        last_save_time = time.perf_counter()
                if window["steps"] and parts is not None:  # the time budget ended between log points
                    last_row = self.metrics_row(parts, teacher, values, grad_norm, window, elapsed)
                    with dist.compare_errors():
                        if self.main:
                            log.write(last_row)
                if cfg.knn_every and stopped_by is None and self.iteration % cfg.knn_every:  # the final teacher's
                    self.log_knn(log, bar)
            finally:
                stop.end_loop(stopped_by is not None)  # Ctrl-C then stops even the stop's checkpoint
                bar.close()
                if log is not None:
                    log.close()
            self.save(elapsed)  # the last checkpoint
        if stopped_by is not None:
            stop.end_run("pretrain", stopped_by, self.iteration, self.out, self.main)
        return self.finish(elapsed, last_row)

    def progress(self, elapsed: float) -> float:
        """The run's progress in [0, 1]: images seen of `epochs`' images, else iterations of
        max_iterations, else minutes of max_minutes."""
        if self.length["schedule_samples"]:
            return min(self.samples_seen / self.length["schedule_samples"], 1.0)
        total = self.length["schedule_iterations"]
        if total:
            return self.iteration / total
        return min(elapsed / (60.0 * self.cfg.max_minutes), 1.0)

    def should_stop(self, elapsed: float) -> bool:
        stop = self.length["stop_iteration"]
        done = stop is not None and self.iteration >= stop
        return done or bool(self.cfg.max_minutes and elapsed >= 60.0 * self.cfg.max_minutes)

    def shared_clock(self, start: float, stop_requested: bool) -> tuple[float, bool]:
        """(Seconds since the run started as process 0 measured them, whether any process was asked to
        stop), in one collective: every process takes the same time-based decisions, schedule values
        and stop."""
        mine = [time.perf_counter() - start if self.main else 0.0, float(stop_requested)]
        clock, stops = dist.all_reduce_sum(torch.tensor(mine, dtype=torch.float64)).tolist()
        return clock, stops > 0

    def skip_step(self, in_a_row: int) -> None:
        """The NaN guard: a step with non-finite losses or gradients was skipped, `in_a_row` of them in a
        row; counted and warned of, and after nan_patience in a row the run stops with what to do."""
        self.counters["skipped_steps"] += 1
        if self.main:
            warnings.warn(f"iteration {self.iteration}: non-finite loss or gradients, step skipped", stacklevel=1)
        if in_a_row >= self.cfg.nan_patience:
            raise DinokitError(
                f"{in_a_row} steps in a row had non-finite losses or gradients (iteration "
                f"{self.iteration}). `resume=true precision=fp32` (or a larger batch_size=...) "
                "continues from the last checkpoint; a lower lr or koleo_loss_weight=0 takes a new "
                "run (another out=...), as resume=true keeps the run's other settings."
            )

    def checkpoint_due(self, last_save_time: float) -> bool:
        """Every checkpoint_every iterations, and checkpoint_every_minutes after the last save by process
        0's clock (broadcast: every process saves together)."""
        cfg = self.cfg
        due = cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0
        minutes = cfg.checkpoint_every_minutes
        due_time = minutes and time.perf_counter() - last_save_time >= 60.0 * minutes
        return bool(due or dist.broadcast(torch.tensor([float(bool(due_time))])).item())

    # ------------------------------------------------------------------------------------ saving
    def save(self, elapsed: float) -> None:
        state = {
            "iteration": self.iteration,
            "samples_seen": self.samples_seen,
            "elapsed_seconds": elapsed,
            "global_batch": self.global_batch,
            "data_fingerprint": self.data_fingerprint,
            "backbone_config": self.model.student.backbone.config.to_dict(),
            "distill_teacher_hash": self.distill_hash if self.frozen_teacher is not None else None,
            "distill_teacher_checkpoint": self.distill_source if self.frozen_teacher is not None else None,
            "counters": self.counters,
            "model": model_state(self.model, self.fsdp),
            "optimizer": optimizer_state(self.model, self.optimizer, self.fsdp),
            "rng": dist.all_gather_objects(rng_state(self.device)),
            "bad_files": sorted(self.share_bad_files()),
            "config": self.cfg.to_dict(),
        }
        # process 0 writes while the others wait in compare_errors' gather (not a barrier, which they
        # would leave with gloo's traceback where its write fails, e.g. on a full disk)
        with dist.compare_errors():
            if self.main:
                save_checkpoint(self.out / "checkpoints", self.iteration, state, self.cfg.keep_checkpoints)

    def finish(self, elapsed: float, last_row: dict) -> dict:
        """The end of a run that was not stopped: the teacher backbone as backbone.safetensors,
        bad_files.txt, and the summary `pretrain` returns."""
        state = model_state(self.model, self.fsdp) if self.fsdp else None  # a collective: every process
        with dist.compare_errors():  # process 0 writes, the others wait (as in `save`)
            backbone = export_teacher_backbone(self.model, self.out / "backbone.safetensors", state)
        self.write_bad_files()
        summary = {
            "out": str(self.out),
            "iterations": self.iteration,
            "epochs": round(self.samples_seen / len(self.paths), 3),
            "minutes": round(elapsed / 60.0, 2),
            "backbone": backbone,
            "last_metrics": last_row,
            "bad_files": self.counters["bad_files"],
            "skipped_steps": self.counters["skipped_steps"],
            **({"knn_top1": self.last_knn} if self.last_knn is not None else {}),
        }
        if self.main:
            print(f"pretrain: done, {summary['iterations']} iterations ({summary['epochs']} epochs) -> {backbone}")
        return summary

    def record_bad(self, batch: "CropBatch") -> None:
        self.unshared_bad.update(str(self.paths[index]) for index in batch.bad)

    def share_bad_files(self) -> set[str]:
        """The unreadable files met by any process so far (a collective): every process then holds the
        same set, and counts each file once however many processes met it."""
        for new in dist.all_gather_objects(sorted(self.unshared_bad - self.bad_paths)):
            self.bad_paths.update(new)
        self.unshared_bad.clear()
        self.counters["bad_files"] = len(self.bad_paths)
        return self.bad_paths

    def write_bad_files(self) -> None:
        every = self.share_bad_files()
        with dist.compare_errors():  # process 0 writes, the others wait (as in `save`)
            if self.main and every:
                write_text(self.out / "bad_files.txt", "".join(f"{p}\n" for p in sorted(every)))
                print(f"pretrain: {len(every)} unreadable file(s) skipped, listed in {self.out / 'bad_files.txt'}")

    # ------------------------------------------------------------------------------------ logging
    def metrics_row(
        self, parts: dict, teacher: dict, values: dict, grad_norm: float, window: dict, elapsed: float
    ) -> dict:
        """Loss parts and health figures averaged over processes, schedule values, speed."""
        names = [k for k in ("loss", "dino", "ibot", "koleo") if k in parts]
        reduced = dist.all_reduce_sum(torch.stack([parts[k].detach().float().cpu() for k in names]))
        reduced = (reduced / dist.world_size()).tolist()
        row = {"iteration": self.iteration, "epoch": round(self.samples_seen / len(self.paths), 4)}
        row.update({("loss" if k == "loss" else f"{k}_loss"): v for k, v in zip(names, reduced, strict=True)})
        row.update({k: values[k] for k in ("lr", "last_layer_lr", "weight_decay", "momentum", "teacher_temp")})
        row.update(collapse_figures(teacher["cls_probs"], teacher["cls"]))
        self.share_bad_files()
        row.update(
            grad_norm=grad_norm,
            img_per_s=window["images"] / max(window["time"], 1e-9),
            data_wait=window["wait"] / max(window["time"], 1e-9),
            bad_files=self.counters["bad_files"],
            skipped_steps=self.counters["skipped_steps"],  # every process skips the same steps
            minutes=elapsed / 60.0,
        )
        return row

    def warn_collapse(self, row: dict, warned: bool) -> bool:
        """Warn once when the figures say the representation has collapsed (after the warm-ups): the CLS
        features all alike, every image on the same prototypes, or every image's targets uniform."""
        if warned or row["iteration"] < 20 or self.progress(row["minutes"] * 60.0) < 0.2:
            return warned
        reasons = []
        if row["cls_spread"] < 0.05:
            reasons.append(f"teacher CLS features nearly identical across images (spread {row['cls_spread']:.3f})")
        if row["teacher_kl_uniform"] > 0.9:
            reasons.append(
                f"teacher puts every image on the same prototypes (KL to uniform {row['teacher_kl_uniform']:.2f})"
            )
        if row["teacher_entropy"] > 0.99:  # the other collapse: KL to uniform 0, spread possibly kept
            reasons.append(
                f"teacher targets nearly uniform for every image (entropy {row['teacher_entropy']:.3f} of log K)"
            )
        if reasons:
            warnings.warn(
                "possible collapse: " + "; ".join(reasons) + ". Try a lower lr, a higher teacher momentum, a lower "
                "teacher_temp, or a larger batch.",
                stacklevel=1,
            )
            return True
        return False

    def log_knn(self, log: MetricsLog | None, bar) -> float:
        """The k-NN monitor: top-1 of knn_val against knn_train on the teacher backbone's CLS (`knn_top1`,
        knn_image_size and knn_resize_policy, the training precision), written as a metrics row {iteration,
        knn_top1, knn_seconds} and printed. Every process computes it (a sharded teacher's forward needs
        them all); the random number generators are left as they were, so training is unchanged.
        Returns the seconds it took."""
        started = time.perf_counter()
        backbone = self.model.teacher.backbone
        cuda = [self.device] if self.device.type == "cuda" else []
        # compared across processes: one failing alone (out of memory) stops the others with its error
        # instead of leaving them in the next step's collective (with FSDP the teacher's forward holds
        # collectives, so only a failure after the last of them is caught so)
        with dist.compare_errors(), torch.random.fork_rng(devices=cuda):
            top1 = knn_top1(
                backbone,
                self.knn_data,
                self.knn_data["size"],
                resize_policy=self.cfg.knn_resize_policy,
                precision=self.cfg.precision,
                num_workers=min(self.cfg.num_workers, 2),
            )
        self.model.train()  # extract_features restores the mode it found; this keeps the step's invariant explicit
        if self.fsdp:  # free the gathered parameters, as after the step's teacher forward
            reshard_teacher(self.model)
        seconds = time.perf_counter() - started
        self.last_knn = round(top1, 2)
        with dist.compare_errors():
            if self.main:
                log.write({"iteration": self.iteration, "knn_top1": top1, "knn_seconds": round(seconds, 2)})
                bar.write(f"pretrain: iteration {self.iteration}: k-NN top-1 {top1:.2f}% ({seconds:.1f} s)")
        return seconds
