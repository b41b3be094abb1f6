"""Feed-forward networks of a transformer block: the classic MLP and SwiGLU (ViT-g)."""

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """fc1 (D -> hidden) -> exact GELU -> fc2 (hidden -> D)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """w3(silu(x1) * x2) with [x1, x2] = w12(x), as the official `SwiGLUFFNFused`.

    `hidden_dim` is the width of x1 (the official code derives it as (int(mlp_hidden * 2/3) + 7) // 8 * 8,
    see `swiglu_hidden_dim`).
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def swiglu_hidden_dim(mlp_hidden_dim: int) -> int:
    """Width of the SwiGLU gate for a nominal MLP width: 2/3 of it, rounded up to a multiple of 8."""
    return (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8
