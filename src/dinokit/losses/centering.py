"""EMA centering of the teacher's logits (DINO): the teacher's softmax is taken after subtracting a
running mean of its own outputs, which keeps one prototype from dominating."""

import torch
from torch import nn

from dinokit.distributed import all_reduce_sum
from dinokit.losses.ibot_loss import row_chunks


class EMACenter(nn.Module):
    """Teacher probabilities with a centered softmax, and the center's EMA update.

        p = softmax((t - c) / tau_t)                              over the last dimension
        c <- m c + (1 - m) (sum of t over rows of every process) / (number of rows over processes)

    `center` (1, K) is a buffer (saved with the model). The update averages over all processes, so
    every process keeps the same center; with equal per-process batches it is the official update
    (the DINO center's case). iBOT's center deviates on purpose: its masked-patch counts differ between
    processes, and the official `iBOTPatchLoss` averages the per-process means (a process with no
    masked patch makes its mean, and then every process's center, NaN); here it is the mean over every
    masked patch of every process, the same value in one process or many.
    """

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def probabilities(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """(N, K) logits -> (N, K) float32 probabilities, a block of rows at a time (`row_chunks`): no
        (N, K) float32 temporaries (the cast, the difference, the quotient), each pass over a block that
        stays in cache. The same values as softmax((logits.float() - center) / temperature); at a DINOv2
        ViT-S/14 step's 605 x 65536 bf16 patch logits on a 2-core Intel Xeon 37 instead of 58 ms (a
        throwaway probe, not in bench/)."""
        probs = teacher_logits.new_empty(teacher_logits.shape, dtype=torch.float32)
        for rows in row_chunks(teacher_logits):  # the difference in float32, as the cast would make it
            z = torch.sub(teacher_logits[rows], self.center).div_(temperature)
            probs[rows] = torch.softmax(z, dim=-1)
        return probs

    @staticmethod
    @torch.no_grad()
    def row_sums(teacher_logits: torch.Tensor) -> torch.Tensor:
        """(N, K) logits -> (K + 1,) float32: their sum over rows, then N. All that `update` needs of
        them, so that a step can let go of the logits before its backward. Summed in float32 a block of
        rows at a time (`row_chunks`), without a float32 copy of them all."""
        sums = teacher_logits.new_zeros(teacher_logits.shape[-1], dtype=torch.float32)
        for rows in row_chunks(teacher_logits):
            sums += teacher_logits[rows].sum(dim=0, dtype=torch.float32)
        return torch.cat([sums, sums.new_full((1,), len(teacher_logits))])  # float32: bf16 rounds counts > 256

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Move the center towards the mean of (N, K) logits (all processes); N = 0 is allowed."""
        self.update_from_row_sums(self.row_sums(teacher_logits))

    @torch.no_grad()
    def update_from_row_sums(self, row_sums: torch.Tensor) -> None:
        """`update` from this process's `row_sums` of its logits (K + 1,)."""
        stats = all_reduce_sum(row_sums.clone())
        count = stats[-1]
        if count > 0:
            self.center.mul_(self.momentum).add_(stats[:-1].unsqueeze(0) / count, alpha=1.0 - self.momentum)
