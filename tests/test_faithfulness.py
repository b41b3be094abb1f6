"""dinokit's pretraining objective against an independent re-implementation of the official
bookkeeping (`dinov2/train/ssl_meta_arch.py: forward_backward`, `dinov2/loss/*`, as
/work/shared/reference/dinov2-official.md sections 3-4 describe it), written here from the formulas
and the official code's order of operations: the swapped teacher rows, the local / global terms
divided by n_g (n_g - 1) + n_g n_l, the 2 x 1/2 iBOT scales, KoLeo summed per global crop, the EMA
centers' and Sinkhorn-Knopp's normalisations. The networks are shared (they are tested elsewhere):
only what is computed from their outputs is compared."""

import copy
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from dinokit import distributed as dist
from dinokit.data.masking import MaskingGenerator
from dinokit.errors import DinokitError
from dinokit.losses import DINOHead, DINOLoss, EMACenter, KoLeoLoss, sinkhorn_knopp
from dinokit.models import create_model
from dinokit.train.config import resolve_config
from dinokit.train.self_distillation import SelfDistillation

STUDENT_TEMP = 0.1


# ----------------------------------------------------------------------------------------- the reference
def official_sinkhorn(t: torch.Tensor, temp: float, n_samples: int, n_iterations: int = 3) -> torch.Tensor:
    """`sinkhorn_knopp_teacher` of one process: exp (no max subtraction: in float64 here, where the
    official float32 would overflow), then the official order of normalisations."""
    q = torch.exp(t.double() / temp).t()
    k = q.shape[0]
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t().float()


def official_ce(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sum_k t log softmax(s / 0.1), per row (`lossfunc` without xFormers)."""
    return torch.sum(t * F.log_softmax(s.float() / STUDENT_TEMP, dim=-1), dim=-1)


def official_dino_loss(student_list, teacher_list) -> torch.Tensor:
    """`DINOLoss.forward`: -sum over (student chunk, teacher chunk) of the batch mean."""
    total = 0
    for s in student_list:
        for t in teacher_list:
            total = total - official_ce(t, s).mean()
    return total


def official_koleo(x: torch.Tensor) -> torch.Tensor:
    """`KoLeoLoss.forward`, eps 1e-8, diagonal filled with -1."""
    x = F.normalize(x.float(), eps=1e-8, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    nn_index = dots.max(dim=1).indices
    d = torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[nn_index])
    return -torch.log(d + 1e-8).mean()


def official_step(model: SelfDistillation, global_crops, local_crops, masks, teacher_temp, centering, n_local):
    """The official forward_backward's losses (n_global_crops = 2) and center updates, computed with
    `model`'s networks and copies of its centers. Returns (losses, new dino center, new ibot center)."""
    n_g = 2
    dino_center = model.dino_center.center.clone()
    ibot_center = model.ibot_center.center.clone()
    mask_indices = masks.flatten().nonzero().flatten()
    n_masked = len(mask_indices)
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    teacher, student = model.teacher, model.student

    with torch.no_grad():
        out = teacher.backbone.forward_features(global_crops)
        cls = out["x_norm_clstoken"].chunk(n_g)
        cls = torch.cat((cls[1], cls[0]))  # swapped: A is matched to B
        patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
        after = teacher.dino_head(torch.cat([cls, patches]))
        t_cls, t_patch = after[: len(cls)], after[len(cls) :]
        if centering == "ema":
            t_cls_p = F.softmax((t_cls - dino_center) / teacher_temp, dim=-1).view(n_g, -1, t_cls.shape[-1])
            t_patch_p = F.softmax((t_patch - ibot_center) / teacher_temp, dim=-1)
            m = model.dino_center.momentum
            dino_center = dino_center * m + t_cls.sum(0, keepdim=True) / len(t_cls) * (1 - m)
            ibot_center = ibot_center * m + t_patch.mean(0, keepdim=True) * (1 - m)
        else:
            t_cls_p = official_sinkhorn(t_cls, teacher_temp, len(t_cls)).view(n_g, -1, t_cls.shape[-1])
            t_patch_p = official_sinkhorn(t_patch, teacher_temp, n_masked)

    g_out, l_out = student.backbone.forward_features([global_crops, local_crops], masks=[masks, None])
    s_patch = g_out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
    s_after = student.dino_head(torch.cat([l_out["x_norm_clstoken"], g_out["x_norm_clstoken"], s_patch]))
    n_l_rows = len(l_out["x_norm_clstoken"])
    s_local, s_global = s_after[:n_l_rows], s_after[n_l_rows : n_l_rows + len(cls)]
    s_patch_after = s_after[n_l_rows + len(cls) :]

    terms = n_g * (n_g - 1) + max(n_local * n_g, 1)
    local = official_dino_loss(s_local.chunk(n_local), t_cls_p) / terms
    global_ = official_dino_loss([s_global], [t_cls_p.flatten(0, 1)]) * 2 / terms
    koleo = 0.1 * sum(official_koleo(p) for p in g_out["x_norm_clstoken"].chunk(2))
    ibot = -(official_ce(t_patch_p, s_patch_after) * masks_weight).sum() / masks.shape[0] * 2 * (1 / n_g)
    losses = {"dino": local + global_, "koleo": koleo, "ibot": ibot, "loss": local + global_ + koleo + ibot}
    return losses, dino_center, ibot_center


# ----------------------------------------------------------------------------------------- dinokit's step
def tiny_model(seed: int = 0, centering: str = "ema") -> SelfDistillation:
    torch.manual_seed(seed)
    backbone = create_model("vit_nano_p2", img_size=8, mask_token=True)
    model = SelfDistillation(
        backbone, head_prototypes=24, head_hidden_dim=16, head_bottleneck_dim=8, centering=centering
    )
    with torch.no_grad():  # a teacher that differs from the student, and centers away from 0
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.dino_center.center.normal_()
        model.ibot_center.center.normal_()
    return model


def batch(b: int = 3, n_local: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(2 * b, 3, 8, 8, generator=g)
    local_crops = torch.randn(n_local * b, 3, 4, 4, generator=g)
    masks = torch.zeros(2 * b, 16, dtype=torch.bool)
    masks[0, [1, 2, 5]] = True  # images with 3, 1 and 6 masked patches, the rest none
    masks[2, 7] = True
    masks[b + 1, 8:14] = True
    return global_crops, local_crops, masks


def dinokit_step(model: SelfDistillation, global_crops, local_crops, masks, teacher_temp):
    weights = (1.0 / masks.sum(1, keepdim=True).clamp(min=1)).expand_as(masks)[masks]
    teacher = model.teacher_outputs(global_crops, masks)
    targets = model.teacher_probabilities(teacher, teacher_temp)
    statistics = model.center_statistics(teacher)
    student = model.student(global_crops, local_crops, masks)
    parts = model.losses(student, targets, 2, weights)
    model.update_centers(statistics)
    return parts


@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
def test_losses_and_centers_equal_the_official_bookkeeping(centering):
    model = tiny_model(centering=centering)
    reference_model = copy.deepcopy(model)
    crops = batch()
    parts = dinokit_step(model, *crops, teacher_temp=0.05)
    expected, dino_center, ibot_center = official_step(reference_model, *crops, 0.05, centering, n_local=4)
    for key in ("dino", "ibot", "koleo"):
        torch.testing.assert_close(parts[key] * model.weights[key], expected[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["loss"], expected["loss"], rtol=1e-5, atol=1e-6)
    # the same gradients reach every student parameter
    grads = torch.autograd.grad(parts["loss"], list(model.student.parameters()), allow_unused=True)
    expected_grads = torch.autograd.grad(
        expected["loss"], list(reference_model.student.parameters()), allow_unused=True
    )
    for (name, _), g, e in zip(model.student.named_parameters(), grads, expected_grads, strict=True):
        if e is None:
            assert g is None or not g.any(), name
        else:
            # float32 sums in another order: the tolerance is 1e-3 of the tensor's largest magnitude
            atol = 1e-3 * float(e.abs().max())
            torch.testing.assert_close(g, e, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    if centering == "ema":  # this step's teacher outputs moved the centers, the official way
        torch.testing.assert_close(model.dino_center.center, dino_center)
        torch.testing.assert_close(model.ibot_center.center, ibot_center)
    else:  # Sinkhorn-Knopp neither reads nor moves the EMA centers
        torch.testing.assert_close(model.dino_center.center, reference_model.dino_center.center)


def test_no_local_crops_average_the_two_cross_view_terms():
    """With 0 local crops the DINO loss is the mean of its 2 cross-view terms (A <- B, B <- A). The
    official code divides their sum by 2 + max(0, 1) = 3 (its `n_local_crops_loss_terms` floor),
    i.e. weights the DINO loss by 2/3 there: a quirk dinokit does not copy."""
    torch.manual_seed(0)
    student = torch.randn(2, 5, 7)
    teacher = torch.softmax(torch.randn(2, 5, 7), dim=-1)
    ce = [-(teacher[t] * torch.log_softmax(student[s] / 0.1, dim=-1)).sum(-1).mean() for s, t in ((0, 1), (1, 0))]
    torch.testing.assert_close(DINOLoss(0.1)(student, teacher), (ce[0] + ce[1]) / 2)


def test_koleo_input_is_the_pre_head_cls_of_each_global_crop_separately():
    """KoLeo sees the student backbone's normed CLS (not the head's output), one crop at a time: two
    images' crops are never each other's neighbours across crops."""
    model = tiny_model()
    global_crops, local_crops, masks = batch()
    student = model.student(global_crops, local_crops, masks)
    cls = model.student.backbone.forward_features(global_crops, masks)["x_norm_clstoken"]
    torch.testing.assert_close(student["cls"], cls)
    targets = model.teacher_probabilities(model.teacher_outputs(global_crops, masks), 0.04)
    weights = (1.0 / masks.sum(1, keepdim=True).clamp(min=1)).expand_as(masks)[masks]
    parts = model.losses(student, targets, 2, weights)
    expected = official_koleo(cls[:3]) + official_koleo(cls[3:])
    torch.testing.assert_close(parts["koleo"], expected)
    assert not math.isclose(float(parts["koleo"].detach()), float(official_koleo(cls.detach())))


# ----------------------------------------------------------------------------------------- heads
def test_dino_head_init_as_official():
    """MLP weights trunc_normal(std 0.02) with zero biases; the weight-normalised last layer keeps
    nn.Linear's default init (U(+-1/sqrt(bottleneck))) for v and has g = 1, as the official head (its
    `apply(_init_weights)` runs before the last layer exists)."""
    torch.manual_seed(0)
    head = DINOHead(384, 4096, hidden_dim=2048, bottleneck_dim=256)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    for m in linears:
        assert m.weight.std().item() == pytest.approx(0.02, rel=0.03)
        assert m.weight.abs().max().item() <= 2.0 and not m.bias.any()
    v = head.last_layer.parametrizations.weight.original1
    bound = 1 / math.sqrt(256)
    assert v.abs().max().item() <= bound and v.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(4096))


# ----------------------------------------------------------------------------------------- masking
class OfficialMaskingGenerator:
    """`dinov2/data/masking.py` with Python's random, for a distribution comparison."""

    def __init__(self, size: int, max_num_patches: int, rng: random.Random) -> None:
        self.height = self.width = size
        self.max_num_patches, self.min_num_patches = max_num_patches, 4
        self.log_aspect = (math.log(0.3), math.log(1 / 0.3))
        self.rng = rng

    def _mask(self, mask: np.ndarray, max_mask_patches: int) -> int:
        delta = 0
        for _ in range(10):
            area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect = math.exp(self.rng.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if w < self.width and h < self.height:
                top, left = self.rng.randint(0, self.height - h), self.rng.randint(0, self.width - w)
                if 0 < h * w - mask[top : top + h, left : left + w].sum() <= max_mask_patches:
                    delta += int(h * w - mask[top : top + h, left : left + w].sum())
                    mask[top : top + h, left : left + w] = True
                if delta > 0:
                    break
        return delta

    def __call__(self, n: int) -> np.ndarray:
        mask, count = np.zeros((self.height, self.width), dtype=bool), 0
        while count < n:
            delta = self._mask(mask, min(n - count, self.max_num_patches))
            if delta == 0:
                break
            count += delta
        return mask


def rows_and_columns(masks: list[np.ndarray]) -> tuple[float, float]:
    """Mean number of masked rows and columns: how blocky (not scattered) the masks are."""
    return float(np.mean([m.any(1).sum() for m in masks])), float(np.mean([m.any(0).sum() for m in masks]))


@pytest.mark.parametrize("target", [26, 77, 128])
def test_block_masks_follow_the_official_generator_in_distribution(target):
    """dinokit's vectorised generator (ViT-S/14 at 224: a 16 x 16 grid, blocks of at most 128 patches)
    against the official Python loops: same masked counts and block shapes, in mean over 400 masks."""
    ours = MaskingGenerator(16, max_num_patches=128)
    official = OfficialMaskingGenerator(16, 128, random.Random(0))
    rng = np.random.default_rng(0)
    a = [ours(target, rng) for _ in range(400)]
    b = [official(target) for _ in range(400)]
    counts_a, counts_b = np.mean([m.sum() for m in a]), np.mean([m.sum() for m in b])
    assert abs(counts_a - counts_b) < 0.03 * target
    for x, y in zip(rows_and_columns(a), rows_and_columns(b), strict=True):
        assert abs(x - y) < 0.05 * y


# ----------------------------------------------------------------------------------------- across processes
def collectives_worker(rank: int, port: int, results: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_distributed(torch.device("cpu"))
    torch.manual_seed(0)
    logits = torch.randn(9, 6) * 3
    out = {}
    # iBOT's masked patches split unevenly over the processes (7 + 2), and all on one (9 + 0)
    for name, split in (("uneven", 7), ("empty", 9)):
        mine = logits[:split] if rank == 0 else logits[split:]
        out[f"sk_{name}"] = sinkhorn_knopp(mine, 0.05)
        center = EMACenter(6, momentum=0.9)
        center.update(mine)
        out[f"center_{name}"] = center.center
    torch.save(out, f"{results}/rank{rank}.pt")
    dist.destroy_distributed()


@pytest.fixture(scope="module")
def collectives(tmp_path_factory):
    import socket

    import torch.multiprocessing as mp

    results = tmp_path_factory.mktemp("collectives")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(collectives_worker, args=(port, str(results)), nprocs=2, join=True)
    torch.manual_seed(0)
    return torch.randn(9, 6) * 3, [torch.load(results / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("name", ["uneven", "empty"])
def test_sinkhorn_knopp_over_uneven_processes_is_the_global_batch_one(collectives, name):
    """iBOT's Sinkhorn-Knopp with B = all_reduce(n_masked): the rows of each process equal those of
    one process holding every masked patch, also when a process holds none."""
    logits, ranks = collectives
    together = torch.cat([ranks[0][f"sk_{name}"], ranks[1][f"sk_{name}"]])
    torch.testing.assert_close(together, official_sinkhorn(logits, 0.05, len(logits)))


@pytest.mark.parametrize("name", ["uneven", "empty"])
def test_ema_center_over_uneven_processes_is_the_global_row_mean(collectives, name):
    """Every process moves its center by the mean over all rows of all processes. For the DINO center
    (equal batches) that is the official update; for iBOT's center, whose masked-patch counts differ
    between processes, the official code averages the per-process means instead (and a process with
    no masked patch would make its mean, and so every center, NaN): dinokit's is the same value in
    one process or many."""
    logits, ranks = collectives
    expected = 0.1 * logits.mean(0, keepdim=True)
    for r in range(2):
        torch.testing.assert_close(ranks[r][f"center_{name}"], expected)


# ----------------------------------------------------------------------------------------- presets
# The official recipes' values (reference section 6.3 for DINOv2, `dino:main_dino.py` defaults for DINO v1),
# schedule lengths as fractions of the official run (warm-up 10 of 100 epochs = 0.1, ...).
DINOV2_DEFAULT = dict(
    objective="dinov2", drop_path_rate=0.3, drop_path_uniform=True, layerscale=1e-5,
    head_prototypes=65536, head_hidden_dim=2048, head_bottleneck_dim=256, head_nlayers=3,
    head_norm_last_layer=False, ibot_separate_head=False, dino_loss_weight=1.0, ibot_loss_weight=1.0,
    koleo_loss_weight=0.1, centering="ema", center_momentum=0.9, student_temp=0.1,
    mask_ratio_min_max=[0.1, 0.5], mask_sample_probability=0.5, global_crops_size=224,
    local_crops_size=98, global_crops_number=2, local_crops_number=8, global_crops_scale=[0.32, 1.0],
    local_crops_scale=[0.05, 0.32], blur_probabilities=[1.0, 0.1, 0.5], blur_as_released=False,
    blur_sigma=[0.1, 2.0], blur_kernel_size=9, solarize_probability=0.2, color_jitter=[0.4, 0.4, 0.2, 0.1],
    color_jitter_probability=0.8, grayscale_probability=0.2, lr=0.004, lr_scaling="sqrt_wrt_1024",
    min_lr=1e-6, warmup=0.1, weight_decay=0.04, weight_decay_end=0.4, layerwise_decay=0.9,
    patch_embed_lr_mult=0.2, adamw_betas=[0.9, 0.999], clip_grad=3.0, clip_grad_per="module",
    freeze_last_layer=0.01, freeze_last_layer_by="lr",
    momentum_teacher=0.992, momentum_teacher_end=1.0, teacher_temp_start=0.04, teacher_temp=0.07,
    teacher_temp_warmup=0.3, epochs=100, batch_size=64,
)  # fmt: skip
DINOV2_LARGE = dict(  # train/vitl14.yaml, vitg14.yaml: 500 epochs, warm-up 80, teacher temperature 30, freeze 1
    DINOV2_DEFAULT, drop_path_rate=0.4, head_prototypes=131072, head_bottleneck_dim=384,
    ibot_separate_head=True, ibot_prototypes=131072, ibot_hidden_dim=2048, ibot_bottleneck_dim=256,
    centering="sinkhorn_knopp", momentum_teacher=0.994, epochs=500, weight_decay_end=0.2, lr=2e-4,
    warmup=80 / 500, layerwise_decay=1.0, teacher_temp_warmup=30 / 500, freeze_last_layer=1 / 500,
)  # fmt: skip
DINO_V1 = dict(
    objective="dino", drop_path_rate=0.1, drop_path_uniform=False, head_prototypes=65536,
    head_hidden_dim=2048, head_bottleneck_dim=256, head_nlayers=3, head_norm_last_layer=True,
    centering="ema", center_momentum=0.9, student_temp=0.1, global_crops_size=224, local_crops_size=96,
    global_crops_number=2, local_crops_number=8, global_crops_scale=[0.4, 1.0], local_crops_scale=[0.05, 0.4],
    blur_probabilities=[1.0, 0.1, 0.5], blur_as_released=False, blur_sigma=[0.1, 2.0], blur_kernel_size=0,
    solarize_probability=0.2, color_jitter=[0.4, 0.4, 0.2, 0.1], color_jitter_probability=0.8,
    grayscale_probability=0.2, lr=5e-4, lr_scaling="linear_wrt_256", min_lr=1e-6, warmup=0.1,
    weight_decay=0.04, weight_decay_end=0.4, layerwise_decay=1.0, patch_embed_lr_mult=1.0,
    adamw_betas=[0.9, 0.999], clip_grad=3.0, clip_grad_per="parameter", freeze_last_layer=0.01,
    freeze_last_layer_by="gradient", momentum_teacher=0.996, momentum_teacher_end=1.0, teacher_temp_start=0.04,
    teacher_temp=0.04, teacher_temp_warmup=0.0,
    epochs=100, batch_size=64,
)  # fmt: skip
OFFICIAL_PRESETS = {
    "dinov2_vits14": dict(DINOV2_DEFAULT, arch="dinov2_vits14"),
    "dinov2_vitb14": dict(DINOV2_DEFAULT, arch="dinov2_vitb14"),
    "dinov2_vitl14": dict(DINOV2_LARGE, arch="dinov2_vitl14", batch_size=32),
    "dinov2_vitg14": dict(DINOV2_LARGE, arch="dinov2_vitg14", batch_size=12),
    "dino_vits16": dict(DINO_V1, arch="dino_vits16"),
    "dino_vitb16": dict(DINO_V1, arch="dino_vitb16"),
}


@pytest.mark.parametrize("preset", sorted(OFFICIAL_PRESETS))
def test_official_presets_hold_the_official_values(preset):
    config = resolve_config(preset, {}).to_dict()
    for key, value in OFFICIAL_PRESETS[preset].items():
        assert config[key] == pytest.approx(value), f"{preset}: {key} = {config[key]}, official {value}"


def test_presets_build_the_official_parts():
    """What the presets build: a DINO v1 ViT without LayerScale nor mask token and linearly rising drop
    path; DINOv2 LayerScale 1e-5, uniform drop path, the mask generator's 0.5 N block limit on the
    16 x 16 grid of 224 / 14."""
    from dinokit.train.build import build_backbone, build_collate

    v1 = build_backbone(resolve_config("dino_vits16", {}))
    assert v1.mask_token is None and not any("gamma" in n for n, _ in v1.named_parameters())
    assert [b.drop_path_rate for b in v1.blocks] == pytest.approx(np.linspace(0, 0.1, 12).tolist())
    cfg = resolve_config("dinov2_vits14", {})
    v2 = build_backbone(cfg)
    assert v2.blocks[0].ls1.gamma.detach().eq(1e-5).all() and v2.mask_token is not None
    assert {b.drop_path_rate for b in v2.blocks} == {0.3}
    generator = build_collate(cfg, 14, use_ibot=True).mask_generator
    assert (generator.height, generator.width, generator.max_num_patches, generator.min_num_patches) == (16, 16, 128, 4)
    assert math.exp(generator.log_aspect[0]) == pytest.approx(0.3) and math.exp(
        generator.log_aspect[1]
    ) == pytest.approx(1 / 0.3)


# ----------------------------------------------------------------------------------------- augmentation
def recipe(compose) -> list[tuple]:
    """(name, parameters) of each transform of a crop's Compose, RandomApply's inner one with its p."""
    steps = []
    for t in compose.transforms:
        p = getattr(t, "p", None)
        inner = t.transforms[0] if isinstance(t, v2.RandomApply) else t
        name = type(inner).__name__
        if isinstance(inner, v2.RandomResizedCrop):
            steps.append((name, tuple(inner.size), tuple(round(s, 4) for s in inner.scale), inner.interpolation.value))
        elif isinstance(inner, v2.ColorJitter):
            values = [inner.brightness, inner.contrast, inner.saturation, inner.hue]
            steps.append((name, tuple(tuple(round(x, 4) for x in v) for v in values), p))
        elif isinstance(inner, v2.GaussianBlur):
            steps.append((name, tuple(inner.kernel_size), tuple(inner.sigma), p))
        elif isinstance(inner, v2.RandomSolarize):
            steps.append((name, inner.threshold, p))
        elif name in ("ToImage", "ToDtype"):
            continue
        else:
            steps.append((name, p))
    return steps


def test_multicrop_is_the_dinov2_recipe():
    """`dinov2/data/augmentations.py` crop by crop: bicubic RandomResizedCrop + flip 0.5, colour jitter
    (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, blur (kernel 9, sigma 0.1-2) 1.0 / 0.1 / 0.5,
    solarisation (128, p 0.2) on the second global crop only, after its blur."""
    from dinokit.train.build import build_augmentation

    aug = build_augmentation(resolve_config("dinov2_vits14", {}))
    jitter = ("ColorJitter", ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)), 0.8)

    def crop(size, scale, blur):
        steps = [("RandomResizedCrop", (size, size), scale, "bicubic"), ("RandomHorizontalFlip", 0.5), jitter]
        return steps + [("RandomGrayscale", 0.2)] + ([("GaussianBlur", (9, 9), (0.1, 2.0), blur)] if blur else [])

    assert recipe(aug.global_first) == crop(224, (0.32, 1.0), 1.0)
    assert recipe(aug.global_other) == [*crop(224, (0.32, 1.0), 0.1), ("RandomSolarize", 128, 0.2)]
    assert recipe(aug.local) == crop(98, (0.05, 0.32), 0.5)
    released = build_augmentation(resolve_config("dinov2_vits14", {"blur_as_released": True}))
    assert recipe(released.global_first) == crop(224, (0.32, 1.0), 0.0)  # never blurred
    assert recipe(released.global_other) == [*crop(224, (0.32, 1.0), 0.9), ("RandomSolarize", 128, 0.2)]
    assert recipe(released.local) == crop(98, (0.05, 0.32), 0.5)


def test_koleo_never_takes_a_sample_as_its_own_neighbour():
    """Two opposite features are each other's neighbour (distance 2); the official -1 diagonal fill
    ties with their similarity -1 and takes the first sample as its own (a term of -log(~2.4e-8))."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(2.0), rel=1e-6)
    assert official_koleo(x).item() == pytest.approx((-math.log(2**0.5 * 1e-8 + 1e-8) - math.log(2.0)) / 2, rel=1e-3)


def test_the_ema_pairs_every_teacher_tensor_with_its_student_tensor():
    """The trainer's EMA zips `student.parameters()` with `teacher.parameters()`: the official update
    covers the backbone and both heads (the weight-norm gain and direction too), tensor by tensor."""
    torch.manual_seed(0)
    backbone = create_model("vit_nano_p2", img_size=8, mask_token=True)
    model = SelfDistillation(
        backbone,
        head_prototypes=12,
        head_hidden_dim=8,
        head_bottleneck_dim=4,
        ibot_separate_head=True,
        ibot_prototypes=10,
    )
    student, teacher = list(model.student.named_parameters()), list(model.teacher.named_parameters())
    assert [(n, p.shape) for n, p in student] == [(n, p.shape) for n, p in teacher]
    names = {n for n, _ in student}
    assert {"dino_head.last_layer.parametrizations.weight.original0", "ibot_head.mlp.0.weight"} <= names


@pytest.mark.parametrize("keys", [{"mask_sample_probability": 0.0}, {"mask_ratio_min_max": [0.0, 0.0]}])
def test_ibot_without_masks_is_refused(keys):
    """iBOT with no image masked (probability 0) or no patch (ratios 0) would train with an iBOT loss of
    0 at every step; the official code asserts both positive when iBOT is on."""
    with pytest.raises(DinokitError, match="iBOT"):
        resolve_config("dinov2_vits14", keys)
    resolve_config("dinov2_vits14", {**keys, "ibot_loss_weight": 0.0})  # iBOT off: masks unused
    resolve_config("dino_vits16", keys)


def test_dino_v1_objective_equals_the_official_dino_loss():
    """objective=dino against `dino:main_dino.py DINOLoss`: the student's crops unmasked, the loss summed
    over (teacher crop iq, student crop v != iq) and divided by their count, the center then moved by
    the batch mean of this step's teacher output."""
    torch.manual_seed(0)
    backbone = create_model("vit_nano_p2", img_size=8, mask_token=False)
    model = SelfDistillation(backbone, objective="dino", head_prototypes=24, head_hidden_dim=16, head_bottleneck_dim=8)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.dino_center.center.normal_()
    center = model.dino_center.center.clone()
    global_crops, local_crops, _ = batch()
    teacher = model.teacher_outputs(global_crops, None)
    parts = model.losses(model.student(global_crops, local_crops), model.teacher_probabilities(teacher, 0.04), 2)
    model.update_centers(model.center_statistics(teacher))
    assert set(parts) == {"dino", "loss"}

    with torch.no_grad():
        teacher_output = model.teacher.dino_head(
            model.teacher.backbone.forward_features(global_crops)["x_norm_clstoken"]
        )
    g, l_ = (f["x_norm_clstoken"] for f in model.student.backbone.forward_features([global_crops, local_crops]))
    student_out = (model.student.dino_head(torch.cat([g, l_])) / 0.1).chunk(2 + 4)
    teacher_out = F.softmax((teacher_output - center) / 0.04, dim=-1).chunk(2)
    total, n_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v != iq:
                total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n_terms += 1
    torch.testing.assert_close(parts["loss"], total / n_terms)
    expected_center = center * 0.9 + teacher_output.sum(0, keepdim=True) / len(teacher_output) * 0.1
    torch.testing.assert_close(model.dino_center.center, expected_center)
