"""The iBOT masked-patch loss (DINOv2): the student predicts the teacher's view of patches it cannot see."""

import torch
from torch import nn

from dinokit.losses.dino_loss import scaled_logits, student_log_probs

# elements of a (rows, prototypes) array that `SoftCrossEntropy` and `EMACenter` work on at once on a
# CPU: 2 MB of float32 temporaries, which stay in a core's L2 cache between the block's passes (8 rows
# of 65536 prototypes). At a DINOv2 ViT-S/14 step's 605 x 65536 masked-patch logits on a 2-core Intel
# Xeon (2 MB of L2 a core), soft_cross_entropy's forward + backward took 116 ms in bf16 with blocks of
# 2^22 elements, 79-82 with 2^18-2^19 (a throwaway probe). Other devices keep blocks of 2^22 (16 MB),
# where each block's kernel launches are what a smaller one would add.
CHUNK_ELEMENTS = 2**19
DEVICE_CHUNK_ELEMENTS = 2**22


class IBOTPatchLoss(nn.Module):
    """Cross-entropy on masked patches, each image weighted equally.

    The teacher sees the unmasked global crops, the student the masked ones. For masked patch p of
    image i(p) (|M_i| masked patches), teacher probabilities q and n images (all global crops,
    including those without a mask, which contribute 0 as in the official code):
        loss = -(1/n) sum_p (1/|M_i(p)|) sum_k q[p, k] log softmax(x[p] / tau_s)_k
    so each masked image contributes the mean over its masked patches. The per-patch cross-entropy
    is `soft_cross_entropy`: no (M, K) float32 array is kept for the backward.
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor, num_images: int
    ) -> torch.Tensor:
        """student_logits, teacher_probs (M, K) over the M masked patches; weights (M,) = 1/|M_i(p)|."""
        with torch.autocast(student_logits.device.type, enabled=False):
            per_patch = soft_cross_entropy(student_logits, teacher_probs, self.student_temp)
            return (per_patch * weights.float()).sum() / max(num_images, 1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """-sum_k targets[m, k] log softmax(logits[m] / temperature)_k per row: (M, K), (M, K) -> (M,), in
    float32 (float64 for float64 logits) whatever the logits' dtype; `SoftCrossEntropy`."""
    return SoftCrossEntropy.apply(logits, targets, temperature)


class SoftCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy to soft targets q, computed a block of rows at a time (`CHUNK_ELEMENTS`):

        ce = -sum_k q_k log_softmax(x / tau)_k
        d ce / d x = (sum(q) softmax(x / tau) - q) / tau,   d ce / d q = -log_softmax(x / tau)

    the values of -(q * log_softmax(x.float() / tau)).sum(-1) (the same per-row products and sums) and
    its gradients to float32 rounding. That composition keeps the (M, K) float32 log-probabilities
    for its backward and makes as large temporaries (the copy, the product with q, and three in the
    backward); here the backward keeps only the logits (in their own dtype) and the targets, and
    makes the logits' gradient, in their dtype, as its one array of their size. At a DINOv2
    ViT-S/14 step's 605 x 65536 masked-patch logits on a 2-core CPU, forward + backward take 195
    instead of 403 ms in bf16, 178 instead of 318 in fp32 (`bench/cpu_training_speed.py`), and the
    step's peak memory is about 300 MB lower (`bench/train_throughput.py`, docs/benchmarks.md).
    Exponentials come from the softmax kernels only: torch.exp and logsumexp are many times slower
    where most of a row's exponentials underflow (x / tau spread over hundreds).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        ce = logits.new_empty(len(logits), dtype=dtype)
        for rows in row_chunks(logits):
            log_p = student_log_probs(logits[rows], temperature)
            ce[rows] = -log_p.mul_(targets[rows].to(dtype)).sum(dim=-1)
        ctx.save_for_backward(logits, targets)
        ctx.temperature = temperature
        return ce

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor):
        logits, targets = ctx.saved_tensors
        tau = ctx.temperature
        dtype = torch.promote_types(logits.dtype, torch.float32)
        grad_logits = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        grad_targets = torch.empty_like(targets) if ctx.needs_input_grad[1] else None
        for rows in row_chunks(logits):
            z = scaled_logits(logits[rows], tau)
            if grad_targets is not None:
                grad_targets[rows] = torch.log_softmax(z, dim=-1).mul_(-grad_ce[rows, None])
            if grad_logits is not None:
                q = targets[rows].to(dtype)
                p = torch.softmax(z, dim=-1)
                grad_logits[rows] = p.mul_(q.sum(dim=-1, keepdim=True)).sub_(q).mul_(grad_ce[rows, None] / tau)
        return grad_logits, grad_targets, None


def row_chunks(x: torch.Tensor) -> list[slice]:
    """Slices of x's rows (M, K) of at most CHUNK_ELEMENTS elements each on a CPU, DEVICE_CHUNK_ELEMENTS
    elsewhere (at least one row)."""
    elements = CHUNK_ELEMENTS if x.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    step = max(1, elements // max(x.shape[-1], 1))
    return [slice(start, start + step) for start in range(0, len(x), step)]
