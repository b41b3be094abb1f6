"""The DINO loss: every student view predicts every teacher view of the same image."""

import torch
from torch import nn


def student_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) in float32 (float64 for float64 logits), (.., K) -> (.., K)."""
    return torch.log_softmax(scaled_logits(logits, temperature), dim=-1)


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in float32 (float64 for float64 logits), (.., K) -> (.., K).

    When the cast makes a copy (bf16 / fp16 logits) the division runs in place on it: one pass less
    over the (rows, prototypes) array, 10-15% of an iBOT-style loss's forward + backward at 605 x 65536
    on a 2-core CPU (`bench/cpu_training_speed.py`). Logits already in that dtype are divided out of
    place, so the caller's tensor is kept. The same values either way.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return z.div_(temperature) if z is not logits else z / temperature


class DINOLoss(nn.Module):
    """Cross-entropy over the (student view, teacher view) pair matrix.

    For S student views and T teacher views (the teacher sees the T global crops, which are also the
    first T student views), B images and teacher probabilities p:
        L[s, t] = -(1/B) sum_b sum_k p[t, b, k] log softmax(x[s, b] / tau_s)_k
        loss = mean of L[s, t] over the valid pairs
    With `ignore_same_view` (DINO, DINOv2) the pairs s == t, a crop predicting itself, are not valid:
    2 global + 8 local crops give 2 x 10 - 2 = 18 pairs, the official count. Without local crops the
    loss is the mean of the 2 cross-view pairs; the official DINOv2 code divides their sum by
    2 + max(n_l n_g, 1) = 3 there (2/3 of the mean), a floor dinokit does not copy.
    """

    def __init__(self, student_temp: float = 0.1, ignore_same_view: bool = True) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.ignore_same_view = ignore_same_view

    def pair_matrix(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """student_logits (S, B, K), teacher_probs (T, B, K) -> L (S, T), in float32 (float64 for float64
        logits; autocast off)."""
        s, b, _ = student_logits.shape
        with torch.autocast(student_logits.device.type, enabled=False):
            log_p = student_log_probs(student_logits, self.student_temp)
            return -(log_p.reshape(s, -1) @ teacher_probs.to(log_p.dtype).reshape(teacher_probs.shape[0], -1).T) / b

    def valid_pairs(self, num_student: int, num_teacher: int, device=None) -> torch.Tensor:
        """(S, T) bool: which pairs count."""
        valid = torch.ones(num_student, num_teacher, dtype=torch.bool, device=device)
        if self.ignore_same_view:
            valid[: min(num_student, num_teacher)].fill_diagonal_(False)
        return valid

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        matrix = self.pair_matrix(student_logits, teacher_probs)
        valid = self.valid_pairs(*matrix.shape, device=matrix.device)
        if not valid.any():
            raise ValueError(
                f"no valid (student, teacher) view pairs for {matrix.shape[0]} student and {matrix.shape[1]} "
                "teacher views: use at least 2 global crops or some local crops"
            )
        return matrix[valid].mean()
