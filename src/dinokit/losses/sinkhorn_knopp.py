"""Sinkhorn-Knopp centering (SwAV; DINOv2 large models): teacher targets that spread the batch
evenly over the prototypes."""

import math

import torch

from dinokit.distributed import all_reduce_max, all_reduce_sum


def _logsumexp(x: torch.Tensor, dim: int | None, across_processes: bool) -> torch.Tensor:
    """log sum exp over `dim` (None: all entries), optionally summed over processes too; the exps
    are of max-subtracted values, so nothing overflows or underflows to an all-zero sum."""
    if x.numel():
        m = x.amax() if dim is None else x.amax(dim=dim, keepdim=True)
    else:
        m = x.new_full(() if dim is None else (x.shape[0], 1), float("-inf"))
    if across_processes:
        m = all_reduce_max(m.reshape(-1).clone()).reshape(m.shape)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum() if dim is None else torch.exp(x - m).sum(dim=dim, keepdim=True)
    if across_processes:
        s = all_reduce_sum(s.reshape(-1).clone()).reshape(s.shape)
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """(N_local, K) logits -> (N_local, K) float32 targets; every row sums to 1.

    With B = N summed over processes and Q = exp(t / tau)^T (K x B):
        Q <- Q / sum(Q)
        repeat n_iterations:  Q <- Q / (K * row sums)    (each prototype gets mass 1/K)
                              Q <- Q / (B * column sums) (each sample gets mass 1/B)
        return (B * Q)^T
    Row sums and the total are summed over processes, so the result for the samples of one process
    is the same as single-process Sinkhorn-Knopp on the whole global batch (the official code calls
    all_reduce unconditionally and needs a process group). Computed in float32 in the log domain:
    every exp is of a max-subtracted value, so small temperatures cannot overflow exp (the official
    code has no guard) and no sample's column can underflow to zero.
    """
    t = teacher_logits.float()
    n_local, k = t.shape
    b = all_reduce_sum(t.new_tensor([float(n_local)])).item()
    if b == 0:
        return t.clone()
    log_q = t.T / temperature  # (K, N_local)
    log_q = log_q - _logsumexp(log_q, None, across_processes=True)
    for _ in range(n_iterations):
        log_q = log_q - _logsumexp(log_q, 1, across_processes=True) - math.log(k)
        log_q = log_q - _logsumexp(log_q, 0, across_processes=False) - math.log(b)
    return torch.exp(log_q + math.log(b)).T
