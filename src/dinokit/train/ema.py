"""The teacher is an exponential moving average of the student."""

from collections.abc import Sequence

import torch


@torch.no_grad()
def update_teacher(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, in place, one fused op over all tensors
    (`torch._foreach_lerp_`: t + (1 - m)(s - t)). Lists must match position by position."""
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors, student {len(student)}")
    torch._foreach_lerp_(list(teacher), list(student), 1.0 - momentum)
