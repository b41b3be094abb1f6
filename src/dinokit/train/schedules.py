"""Per-iteration schedules of self-distillation (`dinov2/train/train.py: build_schedulers`).

Every schedule is a function of the run's progress p in [0, 1]: p = iteration / total iterations,
or elapsed / budget for a run bounded only by `max_minutes`. Phase lengths are fractions of the run
(the official 100-epoch recipe's 10 warm-up epochs are `warmup: 0.1`), so a schedule keeps its shape
whatever the dataset size, batch size or budget. `run_length` says what the run's length is.
"""

import math
from dataclasses import dataclass

from dinokit.errors import DinokitError
from dinokit.train.config import PretrainConfig


def cosine(start: float, end: float, fraction: float) -> float:
    """end + (start - end) (1 + cos(pi f)) / 2: start at f = 0, end at f = 1."""
    fraction = min(max(fraction, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * fraction))


def warmup_cosine(progress: float, base: float, final: float, warmup: float, start: float = 0.0) -> float:
    """Linear from `start` to `base` over p in [0, warmup), then cosine from `base` to `final` over
    [warmup, 1] (`CosineScheduler` of the official code, with p in place of iterations)."""
    if progress < warmup:
        return start + (base - start) * progress / warmup
    if warmup >= 1.0:
        return base
    return cosine(base, final, (progress - warmup) / (1.0 - warmup))


@dataclass(frozen=True)
class Schedules:
    """lr: warm-up from 0, then cosine to `min_lr`; the head's last layer gets lr 0 while
    p < `freeze_last_layer` (and the backbone while p < `freeze_backbone`, for head warm-up on a
    pretrained backbone); weight decay: cosine from `weight_decay` to `weight_decay_end`; teacher
    momentum: cosine from `momentum` to `momentum_end` (1); teacher temperature: linear from
    `teacher_temp_start` to `teacher_temp` over p < `teacher_temp_warmup`, then constant."""

    lr: float
    min_lr: float = 1e-6
    warmup: float = 0.1
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum: float = 0.992
    momentum_end: float = 1.0
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.3
    freeze_last_layer: float = 0.01
    freeze_backbone: float = 0.0

    def __call__(self, progress: float) -> dict[str, float]:
        lr = warmup_cosine(progress, self.lr, self.min_lr, self.warmup)
        if progress < self.teacher_temp_warmup:
            temp = self.teacher_temp_start + (self.teacher_temp - self.teacher_temp_start) * (
                progress / self.teacher_temp_warmup
            )
        else:
            temp = self.teacher_temp
        return {
            "lr": lr,
            "last_layer_lr": 0.0 if progress < self.freeze_last_layer else lr,
            "last_layer_frozen": float(progress < self.freeze_last_layer),
            "backbone_lr_factor": 0.0 if progress < self.freeze_backbone else 1.0,
            "weight_decay": cosine(self.weight_decay, self.weight_decay_end, progress),
            "momentum": cosine(self.momentum, self.momentum_end, progress),
            "teacher_temp": temp,
        }


def run_length(
    cfg: PretrainConfig, num_images: int, global_batch: int, iteration: int = 0, samples_seen: int = 0
) -> dict:
    """Iterations per epoch, the schedule's length in iterations (None: time-based) and stop limits,
    for a run at `iteration` that has seen `samples_seen` images (a resumed run).

    `epochs` are real passes, so their limit is in images: ceil(epochs * N / G) batches of the global
    batch G, and `schedule_samples` is that many images. A run resumed with another global batch
    (batch_size=...) still ends after the same images, in batches of its new size, and its schedules,
    measured in images seen, carry on where they were."""
    per_epoch = num_images / global_batch
    limits = {}
    schedule_samples = None
    if cfg.epochs:
        # rounded first: 2.2 * 25 is 55.000000000000007 in floating point, not one batch more
        schedule_samples = math.ceil(round(cfg.epochs * per_epoch, 9)) * global_batch
        limits["epochs"] = iteration + max(0, math.ceil((schedule_samples - samples_seen) / global_batch))
    if cfg.max_iterations:
        limits["max_iterations"] = cfg.max_iterations
    schedule = limits.get("epochs", limits.get("max_iterations"))
    if schedule is None and not cfg.max_minutes:
        raise DinokitError("set at least one of epochs, max_iterations, max_minutes (0 means no limit)")
    stop = min(limits.values()) if limits else None
    return {
        "iterations_per_epoch": per_epoch,
        "schedule_iterations": schedule,
        "schedule_samples": schedule_samples,
        "stop_iteration": stop,
    }
