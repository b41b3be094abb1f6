"""The fine-tuning configuration: one flat dataclass of every `dinokit finetune` key, its defaults
(the BEiT / MAE ViT fine-tuning recipe, scaled for small data: see `dinokit.train.finetune`) and the
checks that give a clear error before anything is built."""

import dataclasses
from dataclasses import dataclass, field

from dinokit.cli import convert_value
from dinokit.errors import DinokitError, require
from dinokit.train.run_settings import refuse_unknown_keys


@dataclass
class FinetuneConfig:
    """Every key of `dinokit finetune`; lr is for a global batch of 256 (scaled linearly)."""

    # ---- what to fine-tune, on what
    model: str | None = None  # as the eval commands: weights file / folder, run folder, name, random:<arch>
    train: str | None = None  # labelled <class>/<images> folder or path,label CSV
    val: str | None = None  # the reported split: train's classes, no image of train
    # ---- classifier
    avgpool: bool = False  # head input: normed CLS, or CLS concatenated with the mean of the normed patch tokens
    head_init_std: float = 2e-5  # trunc-normal std of the head's weight (MAE 2e-5; DINOv2's linear heads 0.01); bias 0
    # ---- optimisation (AdamW, warm-up then cosine per iteration)
    epochs: int = 20  # passes over train, freeze_backbone_epochs included
    batch_size: int = 64  # images per process and step
    lr: float = 5e-4  # base lr for a global batch of 256: peak lr = lr * global batch / 256 (MAE's blr)
    min_lr: float = 1e-6  # lr at the end of each phase's cosine decay
    warmup_epochs: float = 1.0  # of each phase (the head-only phase and the fine-tuning phase)
    weight_decay: float = 0.05  # not on biases, norms, LayerScale, tokens
    layer_decay: float = 0.75  # block i gets lr x decay^(L - i), embeddings decay^(L + 1), head x 1
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW [beta1, beta2]
    clip_grad: float = 0.0  # max gradient norm of the backbone and of the head, each (0 = off)
    freeze_backbone_epochs: int = 0  # linear probe first: only the head trains in these epochs (= epochs: throughout)
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly with depth to this rate (0 = off)
    label_smoothing: float = 0.1  # s: targets x (1 - s) + s / classes (0 = off)
    # ---- augmentation (training only; val gets the eval commands' transform)
    image_size: int = 224  # training crops' and val images' side in pixels, a multiple of the patch size
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop's area range
    rand_augment: int = 0  # RandAugment magnitude (0 = off; MAE: 9)
    mixup: float = 0.0  # MixUp alpha (0 = off; MAE: 0.8)
    cutmix: float = 0.0  # CutMix alpha (0 = off; MAE: 1.0); with both, each batch gets one of the two
    resize_policy: str = "center_crop"  # of the val transform: center_crop | resize (as eval)
    reduced_decode: bool = True  # large JPEGs decoded at a reduced scale that no crop upsamples (ReducedJpegDecode)
    # ---- runtime
    device: str = "auto"  # auto (a GPU if there is one, else the CPU) | cpu | cuda | cuda:N | mps
    precision: str = "bf16"  # bf16 | fp32
    num_workers: int = 4  # image-decoding worker processes per training process (0: in the training process)
    seed: int = 0  # random seed of the head, data order, augmentation and stochastic depth
    activation_checkpointing: bool = False  # recompute the block activations in the backward: less memory, more compute
    # ---- run folder
    keep_checkpoints: int = 2  # newest checkpoints kept (0 = keep all, one per epoch)
    log_every: int = 10  # iterations between metrics rows (metrics.jsonl, TensorBoard), and each epoch's end
    progress: bool = True  # show a progress bar
    tensorboard: bool = True  # also log the metrics to TensorBoard (tensorboard/ in the run folder)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
# Keys that may change when a run is resumed; any other key must match the saved config.
RESUMABLE_KEYS = {
    "device",
    "precision",
    "num_workers",
    "activation_checkpointing",  # memory, not maths: the same gradients
    "keep_checkpoints",
    "log_every",
    "progress",
    "tensorboard",
}
# What a run's config.yaml records beside its settings.
RUN_FACTS = ("out", "derived")


def resolve_config(values: dict, check: bool = True) -> FinetuneConfig:
    """Defaults <- `values` (typed, or strings from the command line); unknown keys are an error naming
    the nearest valid ones. `check=False` leaves out `validate` (a resumed run's saved settings)."""
    refuse_unknown_keys(values, FIELDS, "finetune", "fine-tuning")
    converted = {}
    for key, value in values.items():
        try:
            converted[key] = value if value is None else convert_value(value, FIELDS[key].type)
        except (ValueError, TypeError) as e:
            raise DinokitError(f"bad value for {key}: {e}") from None
    config = FinetuneConfig(**converted)
    if check:
        validate(config)
    return config


def validate(c: FinetuneConfig) -> None:
    """Clear errors for missing or inconsistent settings, before anything is built."""
    missing = [k for k in ("model", "train", "val") if not getattr(c, k)]
    require(
        [
            (
                not missing,
                f"missing required key(s): {', '.join(f'{k}=...' for k in missing)} "
                "(`dinokit finetune --help` says what each key is)",
            ),
            (c.epochs >= 1, f"epochs must be >= 1, got {c.epochs}"),
            (
                0 <= c.freeze_backbone_epochs <= c.epochs,
                f"freeze_backbone_epochs must lie in [0, epochs] (epochs={c.epochs}; = epochs trains the head "
                f"alone throughout, a linear-probe baseline), got {c.freeze_backbone_epochs}",
            ),
            (c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}"),
            (c.lr > 0 and c.min_lr >= 0, f"lr must be > 0 and min_lr >= 0, got {c.lr}, {c.min_lr}"),
            (c.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {c.warmup_epochs}"),
            (c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay}"),
            (0 < c.layer_decay <= 1, f"layer_decay must lie in (0, 1] (1 = none; e.g. 0.65-0.75), got {c.layer_decay}"),
            (
                len(c.adamw_betas) == 2 and all(0 <= b < 1 for b in c.adamw_betas),
                f"adamw_betas must be [beta1, beta2], each in [0, 1), got {c.adamw_betas}",
            ),
            (c.clip_grad >= 0, f"clip_grad must be >= 0 (0 = off), got {c.clip_grad}"),
            (c.head_init_std > 0, f"head_init_std must be > 0 (MAE 2e-5, DINOv2 0.01), got {c.head_init_std}"),
            (0 <= c.drop_path_rate < 1, f"drop_path_rate must lie in [0, 1), got {c.drop_path_rate}"),
            (0 <= c.label_smoothing < 1, f"label_smoothing must lie in [0, 1), got {c.label_smoothing}"),
            (
                len(c.crop_scale) == 2 and 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1,
                f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {c.crop_scale}",
            ),
            (0 <= c.rand_augment <= 30, f"rand_augment must be a magnitude in 0..30 (0 = off), got {c.rand_augment}"),
            (c.mixup >= 0 and c.cutmix >= 0, f"mixup and cutmix must be >= 0 (0 = off), got {c.mixup}, {c.cutmix}"),
            (
                c.resize_policy in ("center_crop", "resize"),
                f"resize_policy must be center_crop or resize, got {c.resize_policy!r}",
            ),
            (c.precision in ("bf16", "fp32"), f"precision must be bf16 or fp32, got {c.precision!r}"),
            (c.num_workers >= 0, f"num_workers must be >= 0 (0: decode in the training process), got {c.num_workers}"),
            (c.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0 (0 = keep all), got {c.keep_checkpoints}"),
            (c.log_every >= 1, f"log_every must be >= 1, got {c.log_every}"),
            (c.seed >= 0, f"seed must be >= 0, got {c.seed}"),
        ]
    )
