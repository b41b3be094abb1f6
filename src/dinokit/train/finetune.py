"""`dinokit finetune`: supervised fine-tuning of a DINO / DINOv2 backbone for image classification.

Recipe (BEiT / MAE ViT fine-tuning, scaled for small data; each value is a key of `FinetuneConfig`):
- classifier: one nn.Linear on the final normed CLS (avgpool=true: concatenated with the mean of the
  normed patch tokens), weight trunc-normal std 2e-5 (MAE), bias 0;
- AdamW (betas 0.9, 0.999), peak lr = lr x global batch / 256 (lr 5e-4, MAE's base lr), linear warm-up
  then cosine to min_lr, per iteration; layer-wise lr decay 0.75: head and final norm x 1, block i
  x 0.75^(L - i), patch embedding, CLS, position embedding and registers x 0.75^(L + 1); weight decay
  0.05, not on biases, norms, LayerScale or tokens; gradient clipping off (clip_grad=);
- stochastic depth rising to 0.1 at the last block, label smoothing 0.1;
- training images: RandomResizedCrop(image_size, scale 0.08-1, bicubic) + horizontal flip; RandAugment,
  MixUp and CutMix are off by default: on a few thousand images and tens of epochs they slow learning
  more than they regularise (MAE's ImageNet recipe, 100 epochs: rand_augment=9 mixup=0.8 cutmix=1.0);
  val images: the eval commands' transform (`dinokit.eval.common.make_transform`);
- freeze_backbone_epochs=N: first a linear probe (the head alone trains, on the frozen backbone in eval
  mode), then everything; each of the two phases has its own warm-up and cosine;
- precision bf16 autocast (fp32 where bf16 is not supported, or precision=fp32).
An epoch is ceil(N / G) steps of the sample stream of `dinokit.data.unlabelled` (one shuffled order
per pass, augmentation seeded by stream position), for N train images and a global batch G. Val is
evaluated after every epoch; the reported accuracy is the last epoch's (val never picks an epoch).

Run folder `out`: config.yaml, checkpoints/ (one per epoch, and on Ctrl-C / SIGTERM; resume=true
continues exactly), metrics.jsonl, tensorboard/, backbone.safetensors (the fine-tuned backbone, for
every `model=` key), classifier.safetensors (the head, with the metadata `dinokit predict
classification` reads) and finetune.json (the result). `torchrun --nproc_per_node N -m dinokit
finetune ...` runs DDP.
"""

import contextlib
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from dinokit import distributed as dist
from dinokit.data.images import ImageFiles, check_readable, collate_skipping_bad
from dinokit.errors import DinokitError
from dinokit.io import atomic_write, folder_lock, prepare_output, refuse_other_outputs, write_json
from dinokit.models import VisionTransformer
from dinokit.models.vision_transformer import ViTConfig
from dinokit.runtime import (
    StopSignals,
    autocast,
    effective_precision,
    ignore_stop_signals,
    keeps_global_rng,
    resolve_device,
)
from dinokit.train.checkpoint import (
    export_trained_backbone,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dinokit.train.finetune_config import RESUMABLE_KEYS, RUN_FACTS, FinetuneConfig, resolve_config
from dinokit.train.metrics_log import MetricsLog
from dinokit.train.optim import apply_schedule, build_optimizer, clip_gradients, scale_lr
from dinokit.train.run_settings import run_settings
from dinokit.train.schedules import warmup_cosine

NAN_PATIENCE = 5  # stop after this many steps in a row with non-finite losses or gradients


@keeps_global_rng
def finetune(
    model: str | None = None,
    train: str | None = None,
    val: str | None = None,
    out: str = "out/finetune",
    resume: bool = False,
    **keys,
) -> str | None:
    """Fine-tune a backbone with a linear head on labelled images; writes out/finetune.json (returned).

    model: a weights file / folder, a pretraining run folder, a released name or random:<arch> (as the
    eval commands). train, val: labelled `<class>/<images>` folders or `path,label` CSVs (val uses
    train's classes and shares no image with train). Further keys (`dinokit.train.finetune_config.
    FinetuneConfig`): epochs, batch_size (per process), lr (for a global batch of 256), layer_decay,
    weight_decay, drop_path_rate, label_smoothing, mixup, cutmix, rand_augment, freeze_backbone_epochs,
    avgpool, image_size, precision, ... (the recipe: `dinokit.train.finetune`). resume=true continues the
    run in `out` from its newest checkpoint. Several processes: `torchrun --nproc_per_node N -m dinokit
    finetune ...`. Returns the path of finetune.json on process 0, None on the others.
    """
    given = {**{k: v for k, v in dict(model=model, train=train, val=val).items() if v is not None}, **keys}
    out_dir = prepare_output(out, folder=True, create=False)  # a bad out= fails before any work
    refuse_other_outputs(out_dir, ("config.yaml",), "dinokit finetune")
    main = dist.launched_as_process_0()
    # one run per folder: a second one (e.g. resume=true while the first still runs) is refused
    with folder_lock(out_dir, "a fine-tuning run", wait=False) if main else contextlib.nullcontext():
        cfg, resuming = run_config(out_dir, given, resume)
        device = dist.init_distributed(resolve_device(cfg.device))
        try:
            result = Finetuner(cfg, out_dir, device, resuming, "batch_size" in keys).run()
        except BaseException:
            dist.destroy_distributed(wait=False)  # the others may be in a collective: exit with the error
            raise
        dist.destroy_distributed()
    return result if main else None


def run_config(out: Path, keys: dict, resume: bool) -> tuple[FinetuneConfig, bool]:
    """The run's configuration, and whether a checkpoint will be resumed (as `dinokit pretrain`): a
    new run refuses a folder that already holds one; a resumed run takes the saved config, and the
    given keys may only change RESUMABLE_KEYS (and batch_size, keeping the global batch)."""
    return run_settings(
        out,
        keys,
        resume,
        new=resolve_config,
        # a run saved before reduced_decode existed decoded its JPEGs whole: resumed, it goes on so
        resolve=lambda values, check=True: resolve_config({"reduced_decode": False, **values}, check),
        resumable=lambda old: RESUMABLE_KEYS | {"batch_size"},
        facts=RUN_FACTS,
    )


def collate(items: list) -> tuple[torch.Tensor | None, torch.Tensor, list[int]]:
    """MultiCropDataset items (image or None, index, position) -> (images, indices of the good items,
    indices of the unreadable ones)."""
    return collate_skipping_bad([(image, index) for image, index, _ in items])


class Finetuner:
    """One fine-tuning run (see `finetune`)."""

    def __init__(
        self, cfg: FinetuneConfig, out: Path, device: torch.device, resuming: bool, batch_size_given: bool = False
    ) -> None:
        from dinokit.data.finetune_augmentation import SoftTargets, train_transform
        from dinokit.data.transforms import check_image_size
        from dinokit.eval.common import make_transform, prepare_backbone, read_splits
        from dinokit.train.classifier import Classifier, finetune_groups
        from dinokit.train.run_data import data_fingerprint

        self.out, self.device = out, device
        self.main, world = dist.is_main_process(), dist.world_size()
        # an error every process hits is printed once, by process 0 (dist.compare_errors)
        with dist.compare_errors():
            self.checkpoint = load_checkpoint(list_checkpoints(out / "checkpoints")[-1]) if resuming else None
            cfg = self.keep_global_batch(cfg, world, batch_size_given)
            self.cfg, self.global_batch = cfg, cfg.batch_size * world
            train, val, _ = read_splits(cfg.train, cfg.val)
            self.train_paths, self.val_paths = train.paths, val.paths
            self.classes = train.class_names
            self.train_labels, self.val_labels = torch.tensor(train.labels), torch.tensor(val.labels)
            self.fingerprint = data_fingerprint(train.paths, cfg.train)
            if self.checkpoint is not None:
                self.check_same_data()
            check_readable(train.paths, cfg.train)
            check_readable(val.paths, cfg.val)
            if self.global_batch > len(train.paths):
                raise DinokitError(
                    f"a global batch of {self.global_batch} ({world} process(es) x batch_size {cfg.batch_size}) is "
                    f"more than the {len(train.paths)} train images: lower batch_size"
                )
            if self.checkpoint is None:
                start = prepare_backbone(cfg.model, "cpu", cfg.seed)
                backbone = start.model
                self.start = {"source": start.source, "description": start.description, "hash": start.hash}
                self.start["random"] = start.random
            else:  # the weights are in the checkpoint: model= is not read again (moved, offline)
                backbone = VisionTransformer(ViTConfig(**self.checkpoint["backbone_config"]))
                self.start = self.checkpoint["start"]
            check_image_size(cfg.image_size, backbone.patch_size)
        self.steps_per_epoch = math.ceil(len(self.train_paths) / self.global_batch)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.frozen_steps = cfg.freeze_backbone_epochs * self.steps_per_epoch
        self.peak_lr = scale_lr(cfg.lr, self.global_batch, "linear_wrt_256")

        torch.manual_seed(cfg.seed)  # the same head in every process
        self.model = Classifier(backbone.float(), len(self.classes), cfg.avgpool, cfg.head_init_std)
        self.model.backbone.set_drop_path(cfg.drop_path_rate)  # rising to drop_path_rate at the last block
        self.model.backbone.set_activation_checkpointing(cfg.activation_checkpointing)
        self.iteration, self.history, self.elapsed = 0, [], 0.0
        self.epoch_loss = [0.0, 0]  # this epoch's summed loss over every process and step, steps
        self.train_bad: set[str] = set()
        self.val_bad: set[str] = set()
        if self.checkpoint is not None:
            self.model.load_state_dict(self.checkpoint["model"])
            self.iteration, self.history = self.checkpoint["iteration"], list(self.checkpoint["history"])
            self.epoch_loss, self.elapsed = list(self.checkpoint["epoch_loss"]), self.checkpoint["elapsed_seconds"]
            self.train_bad = set(self.checkpoint["train_bad_files"])
            self.val_bad = set(self.checkpoint.get("val_bad_files", []))  # a finished run evaluates no more
        self.model.to(device)
        self.net = self.model  # what the fine-tuning step calls: the model, or its DDP wrapper
        if dist.is_distributed():
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
        self.optimizer = build_optimizer(finetune_groups(self.model, cfg.layer_decay), tuple(cfg.adamw_betas))
        if self.checkpoint is not None:
            self.optimizer.load_state_dict(self.checkpoint["optimizer"])
        self.soft_targets = SoftTargets(len(self.classes), cfg.mixup, cfg.cutmix, cfg.label_smoothing)
        self.train_transform = train_transform(cfg.image_size, cfg.crop_scale, cfg.rand_augment, cfg.reduced_decode)
        self.val_transform = make_transform(cfg.image_size, cfg.resize_policy, cfg.reduced_decode)
        torch.manual_seed(cfg.seed + 1 + dist.rank())  # stochastic depth, MixUp / CutMix
        if self.checkpoint is not None and len(self.checkpoint["rng"]) == world:
            set_rng_state(self.checkpoint["rng"][dist.rank()], device)
        self.write_config()

    # ------------------------------------------------------------------------------------ set-up
    def keep_global_batch(self, cfg: FinetuneConfig, world: int, batch_size_given: bool) -> FinetuneConfig:
        """A resumed run keeps its global batch (its stream positions and lr): on another number of
        processes, batch_size becomes saved global batch / processes."""
        if self.checkpoint is None or self.checkpoint["global_batch"] == cfg.batch_size * world:
            return cfg
        saved = self.checkpoint["global_batch"]
        if batch_size_given or saved % world:
            raise DinokitError(
                f"the run was trained with a global batch of {saved}; resume it with batch_size x processes = {saved}"
                + ("" if saved % world else f" (batch_size={saved // world} on {world} processes)")
            )
        return replace(cfg, batch_size=saved // world)

    def check_same_data(self) -> None:
        """A resumed run continues its sample stream, which names images of its own train set."""
        saved = self.checkpoint["data_fingerprint"]
        if saved != self.fingerprint or self.checkpoint["classes"] != self.classes:
            raise DinokitError(
                f"resume=true continues the run in {self.out}, trained on {saved['images']} images of other names or "
                f"classes than train={self.cfg.train} now holds ({self.fingerprint['images']} images). Resume with "
                f"the run's own data, or fine-tune on the new data in a new run (another out=...)"
            )

    def write_config(self) -> None:
        from dinokit.data.transforms import describe

        cfg = self.cfg
        self.derived = {
            "processes": dist.world_size(),
            "global_batch": self.global_batch,
            "peak_lr": self.peak_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "classes": self.classes,
            "train_transform": describe(self.train_transform),
            "val_transform": describe(self.val_transform),
            "targets": repr(self.soft_targets),
        }
        with dist.compare_errors():  # process 0 writes, the others wait
            if self.main:
                self.out.mkdir(parents=True, exist_ok=True)
                text = yaml.safe_dump({"out": str(self.out), "derived": self.derived, **cfg.to_dict()}, sort_keys=False)
                atomic_write(self.out / "config.yaml", lambda tmp: Path(tmp).write_text(text))
        if self.main:
            print(
                f"finetune: {self.start['description']} -> {len(self.classes)} classes; {len(self.train_paths)} train, "
                f"{len(self.val_paths)} val images; {dist.world_size()} process(es) x batch {cfg.batch_size} = "
                f"{self.global_batch}; {cfg.epochs} epochs of {self.steps_per_epoch} steps; peak lr {self.peak_lr:.3g}"
            )

    def train_loader(self):
        """Batches of the sample stream from this run's position (`StreamBatchSampler`)."""
        from dinokit.data.unlabelled import MultiCropDataset, StreamBatchSampler

        cfg, workers = self.cfg, self.cfg.num_workers
        dataset = MultiCropDataset(self.train_paths, self.train_transform, seed=cfg.seed)
        sampler = StreamBatchSampler(
            len(dataset),
            cfg.batch_size,
            dist.rank(),
            dist.world_size(),
            cfg.seed,
            start=self.iteration * self.global_batch,
        )
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(cfg.seed),  # keeps the loader off the global RNG
            worker_init_fn=ignore_stop_signals,  # Ctrl-C / SIGTERM stop the run in the main process, after a step
        )

    def val_loader(self):
        """This process's share of val (every world-size-th image), in the eval transform."""
        workers = self.cfg.num_workers
        return torch.utils.data.DataLoader(
            ImageFiles(self.val_paths, self.val_transform),
            batch_size=self.cfg.batch_size,
            sampler=list(range(dist.rank(), len(self.val_paths), dist.world_size())),
            num_workers=workers,
            collate_fn=collate_skipping_bad,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.cfg.seed),
            worker_init_fn=ignore_stop_signals,
        )

    # ------------------------------------------------------------------------------------ schedule
    def schedule(self, iteration: int) -> dict[str, float]:
        """lr and weight decay at `iteration` (`apply_schedule`'s values): warm-up and cosine over the
        head-only phase, then again over the fine-tuning phase; the backbone's lr is 0 while frozen."""
        cfg, frozen = self.cfg, iteration < self.frozen_steps
        start, length = (0, self.frozen_steps) if frozen else (self.frozen_steps, self.total_steps - self.frozen_steps)
        epochs = length / self.steps_per_epoch
        lr = warmup_cosine((iteration - start) / length, self.peak_lr, cfg.min_lr, min(1.0, cfg.warmup_epochs / epochs))
        backbone = 0.0 if frozen else 1.0
        return {"lr": lr, "last_layer_lr": lr, "backbone_lr_factor": backbone, "weight_decay": cfg.weight_decay}

    # ------------------------------------------------------------------------------------ steps
    def step(self, images: torch.Tensor, labels: torch.Tensor, values: dict) -> tuple[torch.Tensor, bool]:
        """One optimisation step on this process's batch; returns (loss, accepted)."""
        apply_schedule(self.optimizer, values)
        images, targets = self.soft_targets(images.to(self.device, non_blocking=True), labels.to(self.device))
        frozen = values["backbone_lr_factor"] == 0.0
        with autocast(self.device, self.cfg.precision):
            if frozen:  # a linear probe: the backbone's features without a graph, the head alone learns
                self.model.backbone.eval()
                with torch.no_grad():
                    features = self.model.features(images)
                logits = self.model.head(features)
            else:
                self.model.train()
                logits = self.net(images)
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        if frozen:  # the head's gradients averaged over processes by hand (DDP's forward was not used)
            for p in self.model.head.parameters():
                dist.all_reduce_sum(p.grad).div_(dist.world_size())
        grad_norm = clip_gradients([self.model.backbone, self.model.head], self.cfg.clip_grad)
        bad = torch.tensor([0.0 if torch.isfinite(loss).item() and math.isfinite(float(grad_norm)) else 1.0])
        accepted = dist.all_reduce_max(bad).item() == 0.0  # every process takes the same decision
        if accepted:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), accepted

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """Val top-1 / top-5 (percent) over every process's share, and the images counted."""
        self.model.eval()
        counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, images
        for images, good, bad in loader:
            self.val_bad.update(str(self.val_paths[i]) for i in bad)
            if images is None:
                continue
            with autocast(self.device, self.cfg.precision):
                logits = self.model(images.to(self.device))
            labels = self.val_labels[good].to(self.device)
            top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels[:, None]
            counts += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), len(labels)])
        counts = dist.all_reduce_sum(counts)
        self.model.train()
        if counts[2] == 0:
            raise DinokitError(f"none of the {len(self.val_paths)} val images of {self.cfg.val} could be read")
        return {
            "val_top1": 100.0 * counts[0].item() / counts[2].item(),
            "val_top5": 100.0 * counts[1].item() / counts[2].item(),
        }

    # ------------------------------------------------------------------------------------ state
    def shared(self, paths: set[str]) -> set[str]:
        """The union of every process's `paths` (a collective)."""
        return set().union(*(set(p) for p in dist.all_gather_objects(sorted(paths))))

    def save(self, elapsed: float) -> None:
        self.train_bad, self.val_bad = self.shared(self.train_bad), self.shared(self.val_bad)
        state = {
            "iteration": self.iteration,
            "global_batch": self.global_batch,
            "elapsed_seconds": elapsed,
            "history": self.history,
            "epoch_loss": self.epoch_loss,
            "train_bad_files": sorted(self.train_bad),
            "val_bad_files": sorted(self.val_bad),
            "start": self.start,
            "backbone_config": self.model.backbone.config.to_dict(),
            "classes": self.classes,
            "data_fingerprint": self.fingerprint,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": dist.all_gather_objects(rng_state(self.device)),
            "config": self.cfg.to_dict(),
        }
        with dist.compare_errors():  # process 0 writes while the others wait
            if self.main:
                save_checkpoint(self.out / "checkpoints", self.iteration, state, self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------------------------ loop
    def run(self) -> str | None:
        cfg = self.cfg
        log = None
        with dist.compare_errors():
            if self.main:
                log = MetricsLog(self.out, cfg.tensorboard, self.iteration)
        bar = tqdm(
            total=self.total_steps,
            initial=self.iteration,
            desc="finetune",
            unit="it",
            disable=not (cfg.progress and self.main),
        )
        val_loader = self.val_loader()
        start = time.perf_counter() - self.elapsed
        elapsed, stopped_by, non_finite = self.elapsed, None, 0
        window = torch.zeros(2, dtype=torch.float64)  # summed loss, steps since the last log row
        # the handlers: Ctrl-C's given back after the loop, SIGTERM's after a stop's checkpoint (a repeated
        # SIGTERM is the same stop, ignored until it is written); leaving the block restores every one
        with StopSignals() as stop:
            try:
                iterator = iter(self.train_loader())
                while self.iteration < self.total_steps:
                    requested = dist.all_reduce_sum(torch.tensor([float(stop.requested is not None)]))
                    if requested.item() > 0:  # Ctrl-C or SIGTERM on some process: every process stops here
                        stopped_by = stop.requested or "a signal to another process"
                        break
                    images, good, bad = next(iterator)
                    self.train_bad.update(str(self.train_paths[i]) for i in bad)
                    empty = dist.all_reduce_sum(torch.tensor([float(images is None)]))
                    values = self.schedule(self.iteration)
                    if empty.item() == 0:  # else a batch of unreadable files on some process: skipped everywhere
                        loss, accepted = self.step(images, self.train_labels[good], values)
                        non_finite = 0 if accepted else non_finite + 1
                        if non_finite >= NAN_PATIENCE:
                            raise DinokitError(
                                f"{non_finite} steps in a row had non-finite losses or gradients (iteration "
                                f"{self.iteration}): `resume=true precision=fp32` continues from the last checkpoint; "
                                "a lower lr or clip_grad=1 takes a new run (another out=...)"
                            )
                        if accepted:
                            window += torch.tensor([loss.item(), 1.0])
                    self.iteration += 1
                    bar.update(1)
                    elapsed = time.perf_counter() - start
                    epoch_end = self.iteration % self.steps_per_epoch == 0
                    if self.iteration % cfg.log_every == 0 or epoch_end:
                        row = self.train_row(window, values, elapsed)
                        if epoch_end:  # the epoch's figures in the same row
                            entry = self.end_epoch(val_loader, elapsed)
                            row.update(epoch_train_loss=entry["train_loss"], val_top1=entry["val_top1"])
                            row["val_top5"] = entry["val_top5"]
                        if self.main:
                            log.write(row)
                            shown = (
                                {"val_top1": f"{row['val_top1']:.1f}"} if epoch_end else {"lr": f"{values['lr']:.3g}"}
                            )
                            bar.set_postfix(loss=f"{row['train_loss']:.3f}", **shown)
                    if epoch_end:
                        self.save(elapsed)
            finally:
                stop.end_loop(stopped_by is not None)  # Ctrl-C then stops even the stop's checkpoint
                bar.close()
                if log is not None:
                    log.close()
            if stopped_by is not None:  # the stop's checkpoint
                self.fold(window)  # the steps since the last row count towards this epoch's train loss
                self.save(elapsed)
        if stopped_by is not None:
            stop.end_run("finetune", stopped_by, self.iteration, self.out, self.main)
        return self.finish()

    def fold(self, window: torch.Tensor) -> torch.Tensor:
        """The summed loss and steps of `window` over every process, added to the epoch's (a collective);
        the window is emptied."""
        totals = dist.all_reduce_sum(window.clone())
        window.zero_()
        self.epoch_loss = [self.epoch_loss[0] + totals[0].item(), self.epoch_loss[1] + int(totals[1].item())]
        return totals

    def train_row(self, window: torch.Tensor, values: dict, elapsed: float) -> dict:
        """The mean loss of the steps since the last row over every process, with the schedule values."""
        totals = self.fold(window)
        return {
            "iteration": self.iteration,
            "epoch": round(self.iteration / self.steps_per_epoch, 4),
            "train_loss": totals[0].item() / max(totals[1].item(), 1.0),
            "lr": values["lr"],
            "backbone_lr_factor": values["backbone_lr_factor"],
            "minutes": elapsed / 60.0,
        }

    def end_epoch(self, val_loader, elapsed: float) -> dict:
        """Val accuracy after an epoch and the epoch's train loss, appended to the history."""
        scores = self.evaluate(val_loader)
        total, steps = self.epoch_loss
        entry = {
            "epoch": self.iteration // self.steps_per_epoch,
            "train_loss": total / max(steps, 1),
            **scores,
            "backbone_frozen": self.iteration <= self.frozen_steps,
            "minutes": round(elapsed / 60.0, 3),
        }
        self.history.append(entry)
        self.epoch_loss = [0.0, 0]
        return entry

    # ------------------------------------------------------------------------------------ outputs
    def finish(self) -> str | None:
        """backbone.safetensors, classifier.safetensors and finetune.json (process 0), the table."""
        self.train_bad, self.val_bad = self.shared(self.train_bad), self.shared(self.val_bad)
        path = None
        with dist.compare_errors():  # process 0 writes, the others wait
            if self.main:
                path = self.write_outputs()
        return path

    def write_outputs(self) -> str:
        from dinokit.eval.common import Backbone, prepare_backbone, protocol_record
        from dinokit.eval.heads import head_metadata, save_head

        cfg, model = self.cfg, self.model
        backbone = model.backbone  # as dinokit safetensors: fp32, eval mode, no stochastic depth
        backbone_path = Path(
            export_trained_backbone(backbone.config, backbone.state_dict(), self.out / "backbone.safetensors")
        ).resolve()
        tuned = prepare_backbone(str(backbone_path), "cpu", cfg.seed)  # as predict will read it (weights hash)
        meta = head_metadata(
            tuned,
            cfg.image_size,
            (len(model.backbone.blocks) - 1,),
            True,
            cfg.seed,
            task="classification",
            resize_policy=cfg.resize_policy,
            reduced_decode=cfg.reduced_decode,  # of the val transform, which predict applies
            n_last_blocks=1,
            avgpool=cfg.avgpool,
            classes=self.classes,
            method="finetune",
        )
        head = torch.nn.Linear(model.head.in_features, model.head.out_features)
        head.load_state_dict({k: v.detach().float().cpu() for k, v in model.head.state_dict().items()})
        save_head(self.out / "classifier.safetensors", head, meta)
        start = Backbone(model.backbone, *(self.start[k] for k in ("source", "description", "hash", "random")))
        last = self.history[-1]
        protocol = protocol_record(
            start,
            self.val_transform,
            cfg.image_size,
            cfg.precision,
            train_transform=self.derived["train_transform"],
            targets=self.derived["targets"],
            recipe={
                k: getattr(cfg, k)
                for k in (
                    "epochs",
                    "batch_size",
                    "lr",
                    "min_lr",
                    "warmup_epochs",
                    "weight_decay",
                    "layer_decay",
                    "adamw_betas",
                    "clip_grad",
                    "freeze_backbone_epochs",
                    "drop_path_rate",
                    "label_smoothing",
                    "mixup",
                    "cutmix",
                    "rand_augment",
                    "crop_scale",
                    "avgpool",
                    "head_init_std",
                    "seed",
                )
            },
            global_batch=self.global_batch,
            peak_lr=self.peak_lr,
            processes=dist.world_size(),
            classifier="nn.Linear on the final normed CLS"
            + (" + mean of the normed patch tokens" if cfg.avgpool else ""),
            reported="the last epoch's val accuracy (val picks no epoch)",
            train=str(cfg.train),
            val=str(cfg.val),
            classes=self.classes,
        )
        result = {
            "top1": last["val_top1"],
            "top5": last["val_top5"],
            "epochs": cfg.epochs,
            "history": self.history,
            "train_images": len(self.train_paths) - len(self.train_bad),
            "val_images": len(self.val_paths) - len(self.val_bad),
            "train_bad_files": len(self.train_bad),
            "val_bad_files": len(self.val_bad),
            "bad_files": sorted(self.train_bad | self.val_bad),
            "backbone": str(backbone_path),
            "classifier": str((self.out / "classifier.safetensors").resolve()),
            "fine_tuned_weights_hash": tuned.hash,
            "precision": effective_precision(self.device, cfg.precision),
            "protocol": protocol,
        }
        write_json(self.out / "finetune.json", result)
        self.print_table(result)
        return str(self.out / "finetune.json")

    def print_table(self, result: dict) -> None:
        print(f"fine-tuned {self.start['description']}; val transform: {result['protocol']['transform']}")
        print(f"{'epoch':>6} {'train loss':>11} {'val top-1':>10} {'val top-5':>10}")
        for row in self.history:
            frozen = "  (head only)" if row["backbone_frozen"] else ""
            scores = f"{row['train_loss']:>11.4f} {row['val_top1']:>10.2f} {row['val_top5']:>10.2f}"
            print(f"{row['epoch']:>6} {scores}{frozen}")
        print(
            f"val top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  <- reported (the last epoch); "
            f"{result['train_images']} train / {result['val_images']} val images, "
            f"{len(result['bad_files'])} unreadable skipped"
        )
