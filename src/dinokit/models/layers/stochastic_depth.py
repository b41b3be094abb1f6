"""Stochastic depth of one residual branch, as the official DINOv2 `Block` chooses it by rate."""

from collections.abc import Callable

import torch

# Above this rate the branch runs on a subset of the batch (saving its compute); at or below it each
# sample is dropped independently, as the official Block does (`sample_drop_ratio > 0.1`).
SUBSET_ABOVE = 0.1


def drop_add_residual(
    x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], drop_rate: float
) -> torch.Tensor:
    """x + branch(x), where during training each sample's branch is dropped with rate `drop_rate`.

    drop_rate > 0.1 (the official `drop_add_residual_stochastic_depth`): the branch runs only on a
    random subset of max(int(B * (1 - p)), 1) samples, and its output is added back scaled by
    B / subset, so that the expectation is unchanged and the dropped samples cost nothing.
    0 < drop_rate <= 0.1 (classic DropPath): x + branch(x) * m / (1 - p), m ~ Bernoulli(1 - p) per
    sample. A subset there would drop far more than asked at small batches (at least one sample:
    1 of 8 = 12.5% for p = 0.01). On a CPU the branch then runs only on the samples that m keeps (the
    same result: each sample's branch depends on that sample alone), saving p of its compute; where m
    keeps no sample it runs on all and is multiplied by m = 0, so that its parameters get zero gradients,
    not none (which DDP takes for unused parameters, and AdamW skips). On a GPU (where picking them
    would wait for the device) and under torch.compile (where a changing batch would recompile) it runs
    on all and is multiplied by m. x: (B, N, D).
    """
    if drop_rate <= 0.0:
        return x + branch(x)
    b = x.shape[0]
    if drop_rate <= SUBSET_ABOVE:
        keep = x.new_empty((b,) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - drop_rate)
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return x + branch(x) * keep.div_(1.0 - drop_rate)
        idx = keep.flatten().nonzero().flatten()
        if len(idx) == 0:  # as x + branch(x) * 0: its parameters get zero gradients, not none (DDP, AdamW)
            return x + branch(x) * keep
        if len(idx) == b:
            return torch.add(x, branch(x), alpha=1.0 / (1.0 - drop_rate))
        return AddRows.apply(x, idx, branch(take_rows(x, idx)).to(x.dtype), 1.0 / (1.0 - drop_rate))
    keep = max(int(b * (1.0 - drop_rate)), 1)
    # a random subset via argsort of uniform draws: on CUDA, randperm cost 184 us of host time per call
    # (96 calls per ViT-S step; bench/profile_train_step.py --device cuda)
    idx = torch.rand(b, device=x.device).argsort()[:keep]
    return AddRows.apply(x, idx, branch(take_rows(x, idx)).to(x.dtype), b / keep)


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] for distinct sample indices idx (S,): x (B, ...) -> (S, ...), through index_select, whose
    backward adds the rows' gradients into zeros with index_add. x[idx]'s backward does it with
    index_put(accumulate=True), 4-5x slower on a CPU (the same values): at the ViT-S/14 recipe's shapes
    5.6 against 1.1 ms at 16 x 257 x 384 in fp32, 4.0 against 0.8 ms at 64 x 50 x 384, 2.5 against 1.0
    ms in bf16, about 170 ms of a 5 s fp32 step (`bench/train_throughput.py`, docs/benchmarks.md)."""
    return x.index_select(0, idx)


class AddRows(torch.autograd.Function):
    """x + alpha * rows added at the samples `idx` (torch.index_add), keeping only idx for the backward:
    autograd's own index_add keeps the added rows too (a branch output per block, for nothing;
    `bench/train_throughput.py --saved-activations`: 1743 against 1534 MB in bf16), and
    index_put(accumulate=True), which does not, is 5-10x slower on a CPU (a throwaway probe, forward +
    backward at the bench's shapes: 64 ms against 13 ms at 16 x 257 x 384, 6 ms at 64 x 50 x 384).
    x: (B, ...), idx: (S,) distinct sample indices, rows: (S, ...) of x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.alpha = alpha
        return torch.index_add(x, 0, idx, rows, alpha=alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, idx).mul_(ctx.alpha), None  # scaled where it is made
