"""The pretraining configuration: one flat dataclass, YAML presets shipped in the package, overrides.

Resolution order: the dataclass defaults (DINOv2 ViT-S/14-like) <- the preset's YAML
(`dinokit/train/presets/<name>.yaml`, or a path to a YAML file) <- the keys given by the user. The
resolved configuration is written to the run folder as `config.yaml`.
"""

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dinokit.cli import type_name
from dinokit.errors import DinokitError, require
from dinokit.train.run_settings import refuse_unknown_keys

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass
class PretrainConfig:
    """Every key of `dinokit pretrain` (see README: pretraining). Schedule phases are fractions of the run."""

    # ---- what to train
    objective: str = "dinov2"  # dino (DINO v1: DINO loss) | dinov2 (DINO + iBOT + KoLeo)
    arch: str = "dinov2_vits14"  # any dinokit architecture; the position grid is set to global_crops_size
    init: str | None = None  # start from weights load_model reads (released name, .pth, HF folder, ...)
    # distil from a finished run's frozen teacher (its folder or a checkpoint): DINOv2's distillation of
    # smaller models; its objective and head sizes replace these, no masking nor drop path (train/distillation.py)
    distill_from: str | None = None  # a finished run (folder or checkpoint) whose frozen teacher teaches the student
    # start from another run's students, teachers, heads and centers (not its optimiser nor schedules):
    # DINOv2's high-resolution adaptation (larger crops, a short run) or continued pretraining on new data
    continue_from: str | None = None  # a run (folder or checkpoint) whose model state this run starts from
    drop_path_rate: float = 0.1  # student's stochastic depth in [0, 1), 0 = off (official: student.drop_path_rate)
    drop_path_uniform: bool = True  # true: drop_path_rate in every block (DINOv2); false: rising linearly from 0
    layerscale: float | None = 1e-5  # LayerScale init of a fresh backbone; 0: no LayerScale; None: the architecture's
    # ---- heads and losses
    head_prototypes: int = 65536  # K, the DINO head's outputs (official: dino.head_n_prototypes)
    head_hidden_dim: int = 2048  # width of the head MLP's hidden layers (official: dino.head_hidden_dim)
    head_bottleneck_dim: int = 256  # the head MLP's L2-normed output, before the prototypes (dino.head_bottleneck_dim)
    head_nlayers: int = 3  # Linear layers of the heads' MLP, before the prototypes (official: dino.head_nlayers)
    head_norm_last_layer: bool = False  # True: freeze the weight-norm gain (DINO v1 default)
    ibot_separate_head: bool = False  # true: iBOT gets its own head (ibot_*); false: it shares the DINO head
    ibot_prototypes: int = 65536  # the separate iBOT head's K (ibot_separate_head only; ibot.head_n_prototypes)
    ibot_hidden_dim: int = 2048  # the separate iBOT head's hidden width (ibot_separate_head only)
    ibot_bottleneck_dim: int = 256  # the separate iBOT head's bottleneck width (ibot_separate_head only)
    dino_loss_weight: float = 1.0  # weight of the DINO (CLS) loss in the total (official: dino.loss_weight)
    ibot_loss_weight: float = 1.0  # iBOT masked-patch loss weight, dinov2 only; 0: no iBOT, no masks (ibot.loss_weight)
    koleo_loss_weight: float = 0.1  # KoLeo loss weight (student's CLS), dinov2 only; 0 = off (dino.koleo_loss_weight)
    centering: str = "ema"  # the teacher's targets: ema (EMA center) | sinkhorn_knopp (official: train.centering)
    center_momentum: float = 0.9  # EMA momentum of the teacher's DINO / iBOT centers, centering=ema (official 0.9)
    student_temp: float = 0.1  # softmax temperature of the student, DINO and iBOT (official 0.1, in the losses)
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])  # [min, max] share of a crop masked
    mask_sample_probability: float = 0.5  # share of the global crops iBOT masks (ibot.mask_sample_probability)
    # ---- crops and augmentation
    global_crops_size: int = 224  # side of the global crops in pixels, a multiple of the patch size
    local_crops_size: int = 98  # 7 x 7 patches of the default arch's 14 (the official default 96 is for patch 16)
    global_crops_number: int = 2  # global crops per image: the teacher's and the student's views
    local_crops_number: int = 8  # local crops per image, the student's only (0: none)
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])  # [min, max] area share of the image
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])  # [min, max] area share of the image
    blur_probabilities: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # blur p: 1st global, other, local
    blur_as_released: bool = False  # True: the released checkpoints' inverted blur (0.0 / 0.9 / 0.5)
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # [min, max] of the blur's sigma, crop pixels
    blur_kernel_size: int = 9  # odd side of the blur kernel (official 9); 0: untruncated (DINO v1's PIL blur)
    solarize_probability: float = 0.2  # solarisation (threshold 128) of the second and later global crops
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])  # [brightness, contrast, sat., hue]
    color_jitter_probability: float = 0.8  # colour jitter's probability, per crop
    grayscale_probability: float = 0.2  # grayscale's probability, per crop
    # per_image: torchvision transforms per crop in DataLoader workers (any data size). batched: every
    # image decoded once to batched_image_size px (0: global_crops_size) and kept in memory as uint8,
    # crops and colour augmentation applied to whole batches as tensor ops (data/batched_augmentations.py);
    # several times faster for small images (CIFAR-size), memory N * 3 * size^2 bytes per process.
    augmentation: str = "per_image"  # per_image (in workers) | batched (images in memory, whole-batch crops)
    batched_image_size: int = 0  # augmentation=batched: pixels the images are held at; 0: global_crops_size
    # large JPEGs (photos) decoded at 1/2, 1/4 or 1/8 scale, never so small that a crop is upsampled
    # (data/images.py: ReducedJpegDecode, crops_min_side): a multi-crop item of a 12-megapixel photo
    # 5.2x faster (docs/benchmarks.md)
    reduced_decode: bool = True  # decode large JPEGs at 1/2, 1/4 or 1/8 scale (false: whole, as the official code)
    # ---- optimisation (lr is for a global batch of 1024 with sqrt_wrt_1024, 256 with linear_wrt_256)
    lr: float = 0.004  # peak lr after warm-up, for lr_scaling's reference batch (official: optim.base_lr)
    lr_scaling: str = "sqrt_wrt_1024"  # sqrt_wrt_1024 (DINOv2) | linear_wrt_256 (DINO v1) | none
    min_lr: float = 1e-6  # lr at the end of the cosine decay (official: optim.min_lr)
    warmup: float = 0.1  # lr warm-up from 0, fraction of the run (official: 10 of 100 epochs)
    weight_decay: float = 0.04  # AdamW's at the start, cosine to weight_decay_end; none on biases, norms, LayerScale
    weight_decay_end: float = 0.4  # weight decay at the end of the run (official: optim.weight_decay_end)
    layerwise_decay: float = 0.9  # lr x decay^(L + 1 - d): d 0 embeddings, i + 1 block i, L + 1 final norm; 1 = off
    patch_embed_lr_mult: float = 0.2  # a further lr factor of the patch embedding (official: optim.patch_embed_lr_mult)
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW [beta1, beta2]
    clip_grad: float = 3.0  # max gradient norm; 0 = off
    clip_grad_per: str = "module"  # module: each module's norm (DINOv2) | parameter: each parameter's (DINO v1)
    freeze_last_layer: float = 0.01  # fraction of the run during which the heads' last layer stays fixed
    freeze_last_layer_by: str = "lr"  # lr: lr 0, AdamW moments still move (DINOv2) | gradient: dropped (DINO v1)
    freeze_backbone: float = 0.0  # head warm-up on a frozen backbone (with init=), fraction of the run
    momentum_teacher: float = 0.992  # teacher EMA momentum at the start, cosine to momentum_teacher_end
    momentum_teacher_end: float = 1.0  # teacher EMA momentum at the end (official: teacher.final_momentum_teacher)
    teacher_temp_start: float = 0.04  # at the start, linear to teacher_temp (teacher.warmup_teacher_temp)
    teacher_temp: float = 0.07  # teacher temperature after warm-up (official: teacher.teacher_temp)
    teacher_temp_warmup: float = 0.3  # teacher temperature warm-up, fraction of the run (official: 30 of 100 epochs)
    # ---- length (whichever ends first; the schedule spans epochs / max_iterations, else max_minutes)
    epochs: float | None = 100.0  # real passes over the data (0 or none: no limit)
    max_iterations: int | None = None  # stop after this many iterations (0 or none: no limit)
    max_minutes: float | None = None  # training minutes, k-NN monitor not counted (0 or none: no limit)
    batch_size: int = 64  # images per process and step (global batch: x processes)
    # ---- runtime
    device: str = "auto"  # auto (a GPU if there is one, else the CPU) | cpu | cuda | cuda:N | mps
    precision: str = "bf16"  # bf16 | fp32
    num_workers: int = 8  # image-decoding worker processes per training process (0: in the training process)
    seed: int = 0  # random seed of the initial weights, data order, crops and masks
    fsdp: bool = False  # FSDP2 fully_shard (with torchrun) instead of DDP
    compile: bool = False  # torch.compile the backbone blocks
    # the student's blocks keep only their input for the backward and run their forward again there:
    # memory for a larger batch (ViT-L/g on one GPU), one more forward of the blocks per step (docs/benchmarks.md)
    activation_checkpointing: bool = False  # recompute the student's block activations in the backward: less memory
    reuse_freed_memory: bool = True  # CPU: keep freed memory for reuse (faster steps, more peak memory; runtime.py)
    # ---- k-NN monitor: top-1 (k 20, T 0.07, as `dinokit eval knn`) of the teacher on labelled data,
    # knn_val against knn_train (folders of <class>/ images or path,label CSVs), logged as knn_top1
    knn_every: int = 0  # iterations between k-NN monitor runs (0 = off); also at the end of the run
    knn_train: str | None = None  # the k-NN bank: labelled <class>/<images> folder or path,label CSV
    knn_val: str | None = None  # the labelled images the k-NN monitor classifies (as knn_train)
    knn_image_size: int = 0  # the k-NN monitor's image size in pixels (0: global_crops_size)
    knn_resize_policy: str = "center_crop"  # center_crop | resize (as eval knn's resize_policy)
    # ---- run folder
    checkpoint_every: int = 1000  # iterations between checkpoints (0 = off)
    checkpoint_every_minutes: float = 30.0  # minutes between checkpoints (0 = off)
    keep_checkpoints: int = 3  # newest checkpoints kept (0: keep all)
    log_every: int = 10  # iterations between metrics rows (metrics.jsonl, TensorBoard, the progress bar)
    nan_patience: int = 5  # stop after this many non-finite steps in a row
    progress: bool = True  # show a progress bar
    tensorboard: bool = True  # also log the metrics to TensorBoard (tensorboard/ in the run folder)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


# What a run's config.yaml records beside its settings (save_config): a config.yaml given as preset= or
# config= is read without them (data, out and preset are pretrain's own arguments).
RUN_FACTS = ("data", "out", "preset", "derived")

# Keys that may change when a run is resumed; any other key must match the saved config.
RESUMABLE_KEYS = {
    "epochs",
    "max_iterations",
    "max_minutes",
    "device",
    "precision",
    "num_workers",
    "checkpoint_every",
    "checkpoint_every_minutes",
    "keep_checkpoints",
    "log_every",
    "nan_patience",
    "progress",
    "tensorboard",
    "batch_size",
    "fsdp",
    "compile",
    "activation_checkpointing",  # memory, not maths: the same gradients
    "reuse_freed_memory",
    "knn_every",  # the k-NN monitor only reads the teacher
    "knn_train",
    "knn_val",
    "knn_image_size",
    "knn_resize_policy",
}


def read_preset(preset: str) -> dict:
    """The keys of a shipped preset name or a YAML file path (a run's config.yaml too: its RUN_FACTS are
    left out)."""
    path = Path(preset)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PRESETS_DIR / f"{preset}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(preset, list_presets(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise DinokitError(f"unknown preset {preset!r}.{hint} Shipped presets: {', '.join(list_presets())}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise DinokitError(f"preset {path} must be a mapping of key: value")
    return {k: v for k, v in values.items() if k not in RUN_FACTS}


def coerce(key: str, value):
    """A user value (possibly a string from the command line) converted to the key's declared type."""
    annotation = FIELDS[key].type
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if is_union else (annotation,)
    optional = type(None) in options
    kind = next(t for t in options if t is not type(None))
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "~") and optional:
        return None
    if value is None:
        if optional:
            return None
        raise DinokitError(f"{key} cannot be empty")
    if kind is str:
        return str(value)
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise DinokitError(f"bad value for {key}: {value!r}") from None
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is float:
            return float(value)  # also takes "3e-4", which YAML 1.1 reads as a string
        if kind is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if typing.get_origin(kind) is list:
            if not isinstance(value, list | tuple):
                raise ValueError
            return [float(v) for v in value]
    except (TypeError, ValueError):
        raise DinokitError(f"bad value for {key}: expected {type_name(annotation)}, got {value!r}") from None
    return value


def resolve_config(preset: str | None, overrides: dict, check: bool = True) -> PretrainConfig:
    """Defaults <- preset <- overrides; unknown keys are an error naming the nearest valid keys.
    `check=False` leaves out `validate` (a resumed run's saved settings, checked with the keys given)."""
    values = read_preset(preset) if preset else {}
    values.update({k: v for k, v in overrides.items() if k != "derived"})  # config=<a run's config.yaml>
    refuse_unknown_keys(values, FIELDS, "pretrain", "pretraining")
    config = PretrainConfig(**{k: coerce(k, v) for k, v in values.items()})
    if check:
        validate(config)
    return config


def validate(c: PretrainConfig) -> None:
    """Clear errors for inconsistent settings, before anything is built."""
    checks = [
        (c.objective in ("dino", "dinov2"), f"objective must be dino or dinov2, got {c.objective!r}"),
        (c.centering in ("ema", "sinkhorn_knopp"), f"centering must be ema or sinkhorn_knopp, got {c.centering!r}"),
        (
            c.clip_grad_per in ("module", "parameter"),
            f"clip_grad_per must be module (DINOv2) or parameter (DINO v1), got {c.clip_grad_per!r}",
        ),
        (
            c.freeze_last_layer_by in ("lr", "gradient"),
            f"freeze_last_layer_by must be lr (DINOv2) or gradient (DINO v1), got {c.freeze_last_layer_by!r}",
        ),
        (c.precision in ("bf16", "fp32"), f"precision must be bf16 or fp32, got {c.precision!r}"),
        (
            c.augmentation in ("per_image", "batched"),
            f"augmentation must be per_image or batched, got {c.augmentation!r}",
        ),
        (
            not (c.continue_from and (c.init or c.distill_from)),
            "continue_from= starts from another run's backbones and heads: it cannot be combined with init= or "
            "distill_from=",
        ),
        (c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}"),
        (c.num_workers >= 0, f"num_workers must be >= 0 (0: decode in the training process), got {c.num_workers}"),
        (c.global_crops_number >= 1, "global_crops_number must be >= 1"),
        (c.local_crops_number >= 0, f"local_crops_number must be >= 0, got {c.local_crops_number}"),
        *(
            (value is None or value >= 0, f"{key} must be >= 0 (0: no limit), got {value}")
            for key, value in (
                ("epochs", c.epochs),
                ("max_iterations", c.max_iterations),
                ("max_minutes", c.max_minutes),
            )
        ),
        (
            c.global_crops_number >= 2 or c.local_crops_number >= 1,
            "one global crop and no local crops leave no pair of views to compare",
        ),
        (len(c.blur_probabilities) == 3, "blur_probabilities needs 3 values: first global, other globals, locals"),
        (len(c.mask_ratio_min_max) == 2, "mask_ratio_min_max needs 2 values"),
        (  # as the official code asserts: else the iBOT loss is 0 at every step, silently
            not (c.objective == "dinov2" and c.ibot_loss_weight > 0 and not c.distill_from)
            or (c.mask_sample_probability > 0 and max(c.mask_ratio_min_max, default=0.0) > 0),
            "iBOT (ibot_loss_weight > 0) needs masked patches: mask_sample_probability and the larger "
            f"mask_ratio_min_max value must be > 0, got {c.mask_sample_probability} and {c.mask_ratio_min_max}; "
            "set ibot_loss_weight=0 to train without iBOT",
        ),
        (
            c.blur_kernel_size == 0 or (c.blur_kernel_size > 0 and c.blur_kernel_size % 2 == 1),
            f"blur_kernel_size must be odd (e.g. 9), or 0 for an untruncated Gaussian; got {c.blur_kernel_size}",
        ),
        (
            any(v is not None for v in (c.epochs, c.max_iterations, c.max_minutes)),
            "set at least one of epochs, max_iterations, max_minutes",
        ),
        (0 <= c.warmup <= 1 and 0 <= c.teacher_temp_warmup <= 1, "warmup fractions must lie in [0, 1]"),
        (c.knn_every >= 0, f"knn_every must be >= 0 iterations (0: no k-NN monitor), got {c.knn_every}"),
        (
            not c.knn_every or (c.knn_train and c.knn_val),
            "knn_every needs knn_train=... and knn_val=... (labelled folders or path,label CSVs: the bank and the "
            "images it classifies)",
        ),
        (c.knn_image_size >= 0, f"knn_image_size must be >= 0 (0: global_crops_size), got {c.knn_image_size}"),
        (
            c.knn_resize_policy in ("center_crop", "resize"),
            f"knn_resize_policy must be center_crop or resize, got {c.knn_resize_policy!r}",
        ),
        *value_checks(c),
    ]
    require(checks)


def is_range(values: list[float], low: float, high: float, low_open: bool = False) -> bool:
    """A (min, max) pair with low <= min <= max <= high (low < min with `low_open`)."""
    if len(values) != 2:
        return False
    first, second = values
    return (first > low if low_open else first >= low) and first <= second <= high


def value_checks(c: PretrainConfig) -> list[tuple[bool, str]]:
    """Ranges and list lengths of the values that would otherwise crash a run mid-way with a bare
    traceback (torchvision, NumPy, an index) or train on nonsense (a temperature of 0: NaN losses)."""
    checks = []
    for key in ("global_crops_scale", "local_crops_scale"):
        value = getattr(c, key)
        checks.append(
            (
                is_range(value, 0.0, 1.0, low_open=True),
                f"{key} must be [min, max] with 0 < min <= max <= 1, got {value}",
            )
        )
    checks += [
        (
            is_range(c.mask_ratio_min_max, 0.0, 1.0),
            f"mask_ratio_min_max must be [min, max] with 0 <= min <= max <= 1, got {c.mask_ratio_min_max}",
        ),
        (
            is_range(c.blur_sigma, 0.0, math.inf, low_open=True),
            f"blur_sigma must be [min, max] pixels with 0 < min <= max, got {c.blur_sigma}",
        ),
        (
            len(c.color_jitter) == 4 and min(c.color_jitter) >= 0 and c.color_jitter[3] <= 0.5,
            "color_jitter must be [brightness, contrast, saturation, hue], each >= 0 and hue <= 0.5, "
            f"got {c.color_jitter}",
        ),
        (
            len(c.adamw_betas) == 2 and all(0 <= b < 1 for b in c.adamw_betas),
            f"adamw_betas must be [beta1, beta2], each in [0, 1), got {c.adamw_betas}",
        ),
        (
            all(0 <= p <= 1 for p in c.blur_probabilities),
            f"blur_probabilities must lie in [0, 1], got {c.blur_probabilities}",
        ),
    ]
    for key in (
        "mask_sample_probability",
        "solarize_probability",
        "color_jitter_probability",
        "grayscale_probability",
        "momentum_teacher",
        "momentum_teacher_end",
        "center_momentum",
        "freeze_last_layer",
        "freeze_backbone",
    ):
        value = getattr(c, key)
        checks.append((0 <= value <= 1, f"{key} must lie in [0, 1], got {value}"))
    for key in ("teacher_temp", "teacher_temp_start", "student_temp"):
        value = getattr(c, key)
        checks.append((value > 0, f"{key} must be > 0 (e.g. 0.04), got {value}"))
    for key in (
        "head_prototypes",
        "head_hidden_dim",
        "head_bottleneck_dim",
        "head_nlayers",
        "ibot_prototypes",
        "ibot_hidden_dim",
        "ibot_bottleneck_dim",
        "log_every",
        "nan_patience",
    ):
        value = getattr(c, key)
        checks.append((value >= 1, f"{key} must be >= 1, got {value}"))
    for key, zero in (
        ("checkpoint_every", "off"),
        ("checkpoint_every_minutes", "off"),
        ("keep_checkpoints", "keep all"),
        ("batched_image_size", "global_crops_size"),
    ):
        value = getattr(c, key)
        checks.append((value >= 0, f"{key} must be >= 0 (0: {zero}), got {value}"))
    for key in ("lr", "min_lr", "weight_decay", "weight_decay_end", "patch_embed_lr_mult", "layerwise_decay"):
        value = getattr(c, key)
        checks.append((value >= 0, f"{key} must be >= 0, got {value}"))
    checks.append((0 <= c.drop_path_rate < 1, f"drop_path_rate must lie in [0, 1), got {c.drop_path_rate}"))
    checks.append((c.seed >= 0, f"seed must be >= 0 (it seeds NumPy's generators too), got {c.seed}"))
    return checks


def save_config(config: PretrainConfig, extra: dict) -> str:
    """YAML text of the full resolved configuration plus run facts (data, out, derived values)."""
    return yaml.safe_dump({**extra, **config.to_dict()}, sort_keys=False)
