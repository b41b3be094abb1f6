"""The iBOT masked-patch loss (DINOv2): the student predicts the teacher's view of patches it cannot see."""

import torch
from torch import nn

from dinokit.losses.dino_loss import student_log_probs


class IBOTPatchLoss(nn.Module):
    """Cross-entropy on masked patches, each image weighted equally.

    The teacher sees the unmasked global crops, the student the masked ones. For masked patch p of
    image i(p) (|M_i| masked patches), teacher probabilities q and n images (all global crops,
    including those without a mask, which contribute 0 as in the official code):
        loss = -(1/n) sum_p (1/|M_i(p)|) sum_k q[p, k] log softmax(x[p] / tau_s)_k
    so each masked image contributes the mean over its masked patches.
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor, num_images: int
    ) -> torch.Tensor:
        """student_logits, teacher_probs (M, K) over the M masked patches; weights (M,) = 1/|M_i(p)|."""
        with torch.autocast(student_logits.device.type, enabled=False):
            log_p = student_log_probs(student_logits, self.student_temp)
            per_patch = -(teacher_probs.float() * log_p).sum(dim=-1)
            return (per_patch * weights.float()).sum() / max(num_images, 1)
