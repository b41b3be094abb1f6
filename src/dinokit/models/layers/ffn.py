"""Feed-forward networks of a transformer block: the classic MLP and SwiGLU (ViT-g)."""

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.models.layers.layer_scale import scaled_linear, scaled_weights


class Mlp(nn.Module):
    """fc1 (D -> hidden) -> exact GELU -> fc2 (hidden -> D).

    `forward(x, gain=g)` returns the output times a per-channel gain g (D,), folded into fc2
    (`scaled_weights`): the block's LayerScale during training. Whenever gradients are on
    (`saves_for_backward`), GELU and fc2 run as one `GeluLinear`, which keeps fc1's output for the
    backward instead of fc2's input and recomputes the GELU there.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.fc1(x)
        if not saves_for_backward():
            return scaled_linear(F.gelu(hidden), self.fc2, gain)
        return gelu_linear(hidden, *scaled_weights(self.fc2, gain))


def saves_for_backward() -> bool:
    """Whether blocks take their memory-saving path (`Mlp`, `Block.fold_layer_scale`): whenever gradients
    are on, except while `torch.jit.trace` records a graph (it cannot record an autograd Function)."""
    return torch.is_grad_enabled() and not torch.jit.is_tracing()


class GeluLinear(torch.autograd.Function):
    """F.linear(gelu(h), weight, bias) that saves h, not gelu(h), for the backward.

    Autograd would keep both: h for GELU's gradient and gelu(h) for the linear's. Recomputing gelu(h)
    in the backward (one element-wise pass) instead of keeping it saves a (N, hidden) tensor per block:
    in a DINOv2 ViT-S/14 training step about 260 MB in bf16 of the backbone's 1.5 GB of saved
    activations, at no measurable cost in time. Gradients are those of the two separate ops.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight = ctx.saved_tensors
        grad_h = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.ops.aten.gelu_backward(grad_out @ weight, h)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_out.flatten(0, -2).t() @ F.gelu(h).flatten(0, -2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.flatten(0, -2).sum(0)
        return grad_h, grad_weight, grad_bias


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(F.gelu(h), weight, bias) through `GeluLinear`, under autocast as F.linear would run:
    inputs cast to autocast's dtype (the casts' own backward returns each gradient in its input's dtype).
    h: (..., hidden), weight: (D, hidden), bias: (D,) or None -> (..., D)."""
    device = h.device.type
    if not torch.is_autocast_enabled(device):
        return GeluLinear.apply(h, weight, bias)
    dtype = torch.get_autocast_dtype(device)
    h, weight = h.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device, enabled=False):
        return GeluLinear.apply(h, weight, bias)


class SwiGLUFFN(nn.Module):
    """w3(silu(x1) * x2) with [x1, x2] = w12(x), as the official `SwiGLUFFNFused`.

    `hidden_dim` is the width of x1 (the official code derives it as (int(mlp_hidden * 2/3) + 7) // 8 * 8,
    see `swiglu_hidden_dim`). `forward(x, gain=g)` folds a per-channel output gain into w3, as `Mlp`.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return scaled_linear(F.silu(x1) * x2, self.w3, gain)


def swiglu_hidden_dim(mlp_hidden_dim: int) -> int:
    """Width of the SwiGLU gate for a nominal MLP width: 2/3 of it, rounded up to a multiple of 8."""
    return (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8
