"""KoLeo regulariser (DINOv2): spread the batch's features evenly over the sphere."""

import warnings

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko differential-entropy estimator (Sablayrolles et al., 2019), as DINOv2.

        z_i = x_i / max(||x_i||, 1e-8),   n(i) = argmax_{j != i} z_i . z_j
        loss = -(1/B) sum_i log(||z_i - z_n(i) + 1e-8||_2 + 1e-8)

    In float32 whatever the autocast state; identical features give log(~1e-8), never inf. A batch of
    fewer than 2 samples has no neighbours: the loss is 0 and a warning is issued (DINOv2's KoLeo is
    per process, so a per-process batch of 1 would otherwise give inf/NaN). The diagonal of the
    similarities is set to -2, below any cosine; the official -1 ties with an exact opposite, so that
    in a batch of 2 antipodal features the first is taken as its own neighbour (its term ~17 instead
    of -log 2).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) -> scalar."""
        if x.shape[0] < 2:
            warnings.warn(
                f"KoLeo needs at least 2 samples per process, got {x.shape[0]}: skipped (loss 0); "
                "raise batch_size or set koleo_loss_weight=0",
                stacklevel=2,
            )
            return x.float().sum() * 0.0
        with torch.autocast(x.device.type, enabled=False):
            z = F.normalize(x.float(), p=2, dim=-1, eps=1e-8)
            sims = z @ z.T
            sims.fill_diagonal_(-2.0)  # below any cosine similarity: never its own neighbour
            neighbour = sims.argmax(dim=1)
            distances = F.pairwise_distance(z, z[neighbour], p=2, eps=1e-8)
            return -torch.log(distances + 1e-8).mean()
