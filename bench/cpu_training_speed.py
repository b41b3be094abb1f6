"""The CPU training speed-ups of dinokit, measured against the paths they replace, in one run.

1. Attention forward + backward in bf16: fused `scaled_dot_product_attention` against two matrix
   products and a softmax (`matmul_attention`, what `dinokit.models.layers.attention` uses on CPU in
   bf16), at the `cpu32` shapes (16 + 1 and 4 + 1 tokens, 3 heads of 32), 64 + 1 tokens,
   and ViT-S/224 (256 + 1 tokens, 6 heads of 64), and forward only for ViT-S/224 inference (also in
   fp16, where dinokit keeps SDPA); then the
   `cpu32` backbone's forward + backward on one batch of the preset (2 x 16 + 2 x 8 px crops of 64
   images) with each attention path.
2. Multi-crop augmentation per image at 32 px (2 x 32 + 6 x 16 crops): torchvision transforms one crop
   at a time (`MultiCropAugmentation`) against whole batches (`BatchedMultiCrop`), ms per image.
3. The AdamW step over the parameter groups of the DINOv2 ViT-S/14 recipe (student backbone and
   65536-prototype head): `fused=True` (`dinokit.train.optim.build_optimizer`) against `foreach=True`.
4. The student side of the iBOT loss at the ViT-S/14 recipe's 605 masked patches x 65536 prototypes,
   forward + backward: the temperature division out of place against `student_log_probs` (in place
   on the float32 copy of the bf16 logits), and against `soft_cross_entropy` (blocks of rows, no
   (M, K) float32 array kept: what the iBOT loss runs), in bf16 and fp32.
5. A dense probe's training step (`dinokit eval segmentation`'s linear head on the last 4 layers'
   patch tokens of 16 images at 224 px, 21 classes, logits upsampled to 224 px, cross-entropy,
   AdamW) with glibc's default malloc against inside `dinokit.runtime.reuse_freed_memory()`, as
   `train_dense_head` runs it on a CPU.
6. Stochastic depth at rate 0.1 (per-sample DropPath) in a ViT-S/14 backbone's forward + backward on
   8 global crops at 224 px, bf16: every sample through each branch, multiplied by the drop mask,
   against `drop_add_residual`, which runs each branch on the samples the mask keeps (the same draws).

    python bench/cpu_training_speed.py
"""

import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from dinokit.data.augmentations import MultiCropAugmentation  # noqa: E402
from dinokit.data.batched_augmentations import BatchedMultiCrop  # noqa: E402
from dinokit.eval.dense import upsample  # noqa: E402
from dinokit.eval.segmentation import LinearSegmentationHead, segmentation_loss  # noqa: E402
from dinokit.losses.dino_loss import student_log_probs  # noqa: E402
from dinokit.losses.ibot_loss import soft_cross_entropy  # noqa: E402
from dinokit.models.layers.attention import matmul_attention  # noqa: E402
from dinokit.runtime import reuse_freed_memory  # noqa: E402
from dinokit.train.build import build_backbone, build_model  # noqa: E402
from dinokit.train.config import resolve_config  # noqa: E402
from dinokit.train.optim import param_groups  # noqa: E402


def ibot_loss_ms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
    """ms of forward + backward of the cross-entropy of (M, K) logits to targets, three ways:
    -(q * log_softmax(x.float() / t)).sum(), the same through student_log_probs, soft_cross_entropy."""
    logits.requires_grad_()

    def composed(log_probs) -> float:
        return median_ms(lambda: (-(targets * log_probs(logits)).sum()).backward(), repeats=5)

    divided = composed(lambda x: torch.log_softmax(x.float() / 0.1, dim=-1))
    in_place = composed(lambda x: student_log_probs(x, 0.1))
    blocks = median_ms(lambda: soft_cross_entropy(logits, targets, 0.1).sum().backward(), repeats=5)
    return divided, in_place, blocks


def median_ms(fn, repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def attention_ms(fn, shape, backward: bool = True) -> float:
    q, k, v = (torch.randn(*shape, dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))
    if not backward:
        with torch.inference_mode():
            return median_ms(lambda: fn(q, k, v), repeats=20)
    return median_ms(lambda: fn(q, k, v).float().sum().backward())


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\nattention forward + backward, bf16 (ms): shape | SDPA | matmul | speed-up")
    for shape in [(128, 3, 17, 32), (128, 3, 5, 32), (128, 3, 65, 32), (16, 6, 257, 64)]:
        fused, matmul = attention_ms(F.scaled_dot_product_attention, shape), attention_ms(matmul_attention, shape)
        print(f"{shape} | {fused:.1f} | {matmul:.1f} | {fused / matmul:.1f}x")
    # ViT-S/14 inference at 224 px: a CPU slice of 3 images (1024 tokens), a batch of 32 unsliced; ViT-B/14 at
    # 518 px; and cpu32's 17-token crops. Which is faster depends on the CPU (models/layers/attention.py: AMX)
    for shape in [(3, 6, 257, 64), (32, 6, 257, 64), (2, 12, 1370, 64), (128, 3, 17, 32)]:
        fused = attention_ms(F.scaled_dot_product_attention, shape, backward=False)
        matmul = attention_ms(matmul_attention, shape, backward=False)
        print(f"attention forward only (inference), bf16: {shape} | {fused:.2f} | {matmul:.2f} | {fused / matmul:.2f}x")
    shape = (3, 6, 257, 64)
    q, k, v = (torch.randn(*shape, dtype=torch.float16) for _ in range(3))  # fp16 keeps SDPA: why
    with torch.inference_mode():
        fused = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats=20)
        matmul = median_ms(lambda: matmul_attention(q, k, v), repeats=20)
    print(f"attention forward only (inference), fp16: {shape} | {fused:.2f} | {matmul:.2f} | {fused / matmul:.2f}x")

    cfg = resolve_config("cpu32", {})
    backbone = build_backbone(cfg)
    size, local_size = cfg.global_crops_size, cfg.local_crops_size
    global_crops = torch.randn(2 * cfg.batch_size, 3, size, size)
    local_crops = torch.randn(cfg.local_crops_number * cfg.batch_size, 3, local_size, local_size)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = backbone(global_crops).float().sum() + backbone(local_crops).float().sum()
        loss.backward()

    matmul_step = median_ms(step, repeats=5)
    with mock.patch("dinokit.models.layers.attention.use_matmul_attention", return_value=False):
        fused_step = median_ms(step, repeats=5)
    print(
        f"\ncpu32 backbone forward + backward, bf16, one batch: SDPA {fused_step:.0f} ms, matmul {matmul_step:.0f} ms"
    )

    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    options = dict(
        global_crops_size=32,
        local_crops_size=16,
        local_crops_number=6,
        global_crops_scale=(0.32, 1.0),
        local_crops_scale=(0.05, 0.32),
        blur_probabilities=(0.0, 0.0, 0.0),
        blur_kernel_size=0,
    )
    per_image = MultiCropAugmentation(**options)
    pictures = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    per_image_ms = median_ms(lambda: [per_image(p) for p in pictures], repeats=3) / len(images)
    batched = BatchedMultiCrop(**options)
    generator = torch.Generator().manual_seed(0)
    batched_ms = median_ms(lambda: batched(images, generator), repeats=5) / len(images)
    print(
        f"\nmulti-crop augmentation at 32 px, ms per image: per image {per_image_ms:.2f}, batched {batched_ms:.2f} "
        f"({per_image_ms / batched_ms:.1f}x)"
    )

    model = build_model(resolve_config("dinov2_vits14", {})).student
    groups = param_groups(model.backbone, model.heads(), 0.9, 0.2)
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    step_ms = {}
    for name, kind in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.04, **kind)
        step_ms[name] = median_ms(optimizer.step, repeats=5)
    print(
        f"\nAdamW step, ViT-S/14 + 65536-prototype head ({sum(p.numel() for p in params) / 1e6:.1f}M parameters, "
        f"{len(groups)} groups): foreach {step_ms['foreach']:.0f} ms, fused {step_ms['fused']:.0f} ms "
        f"({step_ms['foreach'] / step_ms['fused']:.1f}x)"
    )

    # 605 rows: the masked patches of one batch of bench/train_throughput.py (ViT-S/14 recipe, batch 8)
    # logits of 0.3 x randn are a head's (cosines times g, about 1: |x| <= 1); 3 x randn, where most of a
    # row's exponentials underflow at t = 0.1, what this line measured before soft_cross_entropy
    targets = torch.softmax(5 * torch.randn(605, 65536), dim=-1)
    for dtype, scale in ((torch.bfloat16, 0.3), (torch.float32, 0.3), (torch.bfloat16, 3.0)):
        divided, in_place, blocks = ibot_loss_ms((scale * torch.randn(605, 65536)).to(dtype), targets)
        print(
            f"\niBOT-style loss forward + backward, {str(dtype)[6:]} logits {scale} x randn, 605 x 65536: "
            f"log_softmax(x.float() / t) {divided:.0f} ms, student_log_probs {in_place:.0f} ms "
            f"({divided / in_place:.2f}x), soft_cross_entropy {blocks:.0f} ms ({divided / blocks:.2f}x)"
        )

    head = LinearSegmentationHead(4 * 384, 21)
    head_optimizer = torch.optim.AdamW(head.parameters())
    tokens, labels = torch.randn(16, 4, 256, 384), torch.randint(0, 21, (16, 224, 224))
    loss_fn = segmentation_loss(ignore_index=255)

    def dense_step() -> None:
        loss_fn(upsample(head(tokens, None, (16, 16)), (224, 224)), labels).backward()
        head_optimizer.step()
        head_optimizer.zero_grad(set_to_none=True)

    default_ms = median_ms(dense_step, repeats=9)
    with reuse_freed_memory() as applied:
        reused_ms = median_ms(dense_step, repeats=9)
    print(
        f"\ndense probe step, 16 x 21 classes at 224 px: default malloc {default_ms:.0f} ms, "
        f"reuse_freed_memory {reused_ms:.0f} ms ({default_ms / reused_ms:.2f}x)" + ("" if applied else " (not glibc)")
    )

    vit = build_backbone(resolve_config("dinov2_vits14", {"drop_path_rate": 0.1, "drop_path_uniform": True})).train()
    crops = torch.randn(8, 3, 224, 224)

    def vit_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = vit(crops).float().sum()
        loss.backward()

    def masked_drop_path(x, branch, rate):
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
        return x + branch(x) * keep.div_(1.0 - rate)

    kept_only = median_ms(vit_step, repeats=5)
    with mock.patch("dinokit.models.layers.block.drop_add_residual", masked_drop_path):
        masked = median_ms(vit_step, repeats=5)
    print(
        f"\nViT-S/14 forward + backward, 8 x 224 px, bf16, drop path 0.1: every sample, masked {masked:.0f} ms, "
        f"kept samples only {kept_only:.0f} ms ({masked / kept_only:.2f}x)"
    )


if __name__ == "__main__":
    main()
