"""What a pretraining run is made of, built from its `PretrainConfig`: the backbone, the
self-distillation model (student, teacher, heads, losses), the multi-crop augmentation, the collate
(iBOT masks) and the schedules."""

from dinokit.data.augmentations import MultiCropAugmentation
from dinokit.data.batched_augmentations import BatchedMultiCrop
from dinokit.data.collate import MultiCropCollate
from dinokit.data.masking import MaskingGenerator
from dinokit.data.transforms import check_image_size
from dinokit.errors import DinokitError
from dinokit.models import create_model, load_model
from dinokit.models.vision_transformer import VisionTransformer, ViTConfig
from dinokit.train.config import PretrainConfig
from dinokit.train.optim import scale_lr
from dinokit.train.schedules import Schedules
from dinokit.train.self_distillation import SelfDistillation


def build_backbone(cfg: PretrainConfig, resumed_config: dict | None = None) -> VisionTransformer:
    """A fresh backbone of `cfg.arch` (position grid at the global crop size), or `cfg.init`'s weights.
    resumed_config: the architecture (`ViTConfig.to_dict`) of weights the trainer loads afterwards: a
    checkpoint's (a resumed run started from init= does not read init= again: moved, deleted,
    offline), or the continue_from= run's."""
    masked_ibot = cfg.objective == "dinov2" and cfg.ibot_loss_weight > 0 and not cfg.distill_from
    if (cfg.init or cfg.continue_from) and resumed_config is not None:
        if cfg.continue_from and masked_ibot:  # a distilled run's student has none: it starts a fresh one
            resumed_config = {**resumed_config, "mask_token": True}
        backbone = VisionTransformer(ViTConfig(**resumed_config))
    elif cfg.init:
        backbone = load_model(cfg.init)
        if masked_ibot and backbone.mask_token is None:
            raise DinokitError(f"init={cfg.init} has no mask token, which iBOT needs: use objective=dino")
    else:
        overrides = dict(img_size=cfg.global_crops_size, mask_token=masked_ibot)
        if cfg.layerscale is not None:
            overrides["init_values"] = cfg.layerscale or None  # 0: no LayerScale (DINO v1)
        try:
            backbone = create_model(cfg.arch, **overrides)
        except (ValueError, TypeError) as e:
            raise DinokitError(str(e)) from None
    backbone.set_drop_path(cfg.drop_path_rate, cfg.drop_path_uniform)
    return backbone


def build_model(cfg: PretrainConfig, resumed_config: dict | None = None) -> SelfDistillation:
    """The student and EMA teacher (`build_backbone` and fresh heads) with `cfg`'s objective; the
    student's blocks checkpointed with activation_checkpointing (the teacher runs without gradients)."""
    model = SelfDistillation(
        build_backbone(cfg, resumed_config),
        objective=cfg.objective,
        head_prototypes=cfg.head_prototypes,
        head_hidden_dim=cfg.head_hidden_dim,
        head_bottleneck_dim=cfg.head_bottleneck_dim,
        head_nlayers=cfg.head_nlayers,
        head_norm_last_layer=cfg.head_norm_last_layer,
        ibot_separate_head=cfg.ibot_separate_head,
        ibot_prototypes=cfg.ibot_prototypes,
        ibot_hidden_dim=cfg.ibot_hidden_dim,
        ibot_bottleneck_dim=cfg.ibot_bottleneck_dim,
        centering=cfg.centering,
        center_momentum=cfg.center_momentum,
        student_temp=cfg.student_temp,
        dino_loss_weight=cfg.dino_loss_weight,
        ibot_loss_weight=cfg.ibot_loss_weight,
        koleo_loss_weight=cfg.koleo_loss_weight,
        masked_inputs=not cfg.distill_from,  # distillation: iBOT on whole crops (train/distillation.py)
    )
    model.student.backbone.set_activation_checkpointing(cfg.activation_checkpointing)
    return model


def check_crop_sizes(cfg: PretrainConfig, patch_size: int) -> None:
    """Crops must tile into whole patches; checked before the run folder gets its config.yaml."""
    for key in ("global_crops_size", "local_crops_size"):
        check_image_size(getattr(cfg, key), patch_size, name=key)


def build_augmentation(cfg: PretrainConfig) -> MultiCropAugmentation | BatchedMultiCrop:
    """The multi-crop augmentation of `cfg`: per image (torchvision transforms), or for
    augmentation=batched the same parameters applied to whole batches of in-memory images."""
    if cfg.augmentation == "batched":
        kind, decode = BatchedMultiCrop, {}  # its images are decoded once, by decode_to_memory
    else:
        kind, decode = MultiCropAugmentation, {"reduced_decode": cfg.reduced_decode}
    return kind(
        **decode,
        global_crops_size=cfg.global_crops_size,
        local_crops_size=cfg.local_crops_size,
        global_crops_number=cfg.global_crops_number,
        local_crops_number=cfg.local_crops_number,
        global_crops_scale=cfg.global_crops_scale,
        local_crops_scale=cfg.local_crops_scale,
        blur_probabilities=cfg.blur_probabilities,
        blur_as_released=cfg.blur_as_released,
        blur_sigma=cfg.blur_sigma,
        blur_kernel_size=cfg.blur_kernel_size,
        solarize_probability=cfg.solarize_probability,
        color_jitter=cfg.color_jitter,
        color_jitter_probability=cfg.color_jitter_probability,
        grayscale_probability=cfg.grayscale_probability,
    )


def build_collate(cfg: PretrainConfig, patch_size: int, use_ibot: bool) -> MultiCropCollate:
    """Crops -> `CropBatch`, with iBOT's block masks on the global crops' patch grid where `use_ibot`."""
    generator = None
    if use_ibot:
        grid = cfg.global_crops_size // patch_size
        generator = MaskingGenerator(grid, max_num_patches=int(0.5 * grid * grid))
    return MultiCropCollate(generator, tuple(cfg.mask_ratio_min_max), cfg.mask_sample_probability, cfg.seed)


def build_schedules(cfg: PretrainConfig, global_batch: int) -> Schedules:
    """lr (scaled to the global batch), weight decay, teacher momentum and temperature, freezes."""
    return Schedules(
        lr=scale_lr(cfg.lr, global_batch, cfg.lr_scaling),
        min_lr=cfg.min_lr,
        warmup=cfg.warmup,
        weight_decay=cfg.weight_decay,
        weight_decay_end=cfg.weight_decay_end,
        momentum=cfg.momentum_teacher,
        momentum_end=cfg.momentum_teacher_end,
        teacher_temp_start=cfg.teacher_temp_start,
        teacher_temp=cfg.teacher_temp,
        teacher_temp_warmup=cfg.teacher_temp_warmup,
        freeze_last_layer=cfg.freeze_last_layer,
        freeze_backbone=cfg.freeze_backbone,
    )
