"""LayerScale (CaiT): a learned per-channel gain on each residual branch."""

import torch
from torch import nn


class LayerScale(nn.Module):
    """y = x * gamma, gamma (D,) initialised to `init_values`."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
