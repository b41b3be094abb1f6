"""Multi-head self-attention through `torch.nn.functional.scaled_dot_product_attention`, or through two
matrix products and a softmax where that is faster: training on CPU in bf16 / fp16.

PyTorch's fused CPU attention backward in reduced precision is slow: forward + backward in bf16 is
2.4x and 11x faster through matmuls at 65 and 17 tokens (3 heads of 32), 1.1x at 257 tokens (6 heads
of 64), on this project's AVX512-BF16 CPU; in fp32 SDPA is as fast as matmuls or faster.
`bench/cpu_training_speed.py` measures both paths.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """qkv = Linear(D, 3D) with rows ordered [q; k; v] (the official layout), SDPA, then proj.

    `forward(x, return_attention=True)` computes softmax(q k^T / sqrt(d)) explicitly and returns it too
    (B, heads, T, T): the path used for attention maps, since fused SDPA kernels do not expose it.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, d_head)
        if return_attention:
            scale = q.shape[-1] ** -0.5
            attn = (q.float() @ k.float().transpose(-2, -1) * scale).softmax(dim=-1)
            out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, d)
            return self.proj(out), attn
        if cpu_low_precision_training(q):
            logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            out = logits.float().softmax(dim=-1).to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def cpu_low_precision_training(q: torch.Tensor) -> bool:
    """True when attention on `q` will be differentiated on CPU in bf16 / fp16 (module docstring)."""
    return q.device.type == "cpu" and q.dtype != torch.float32 and q.requires_grad and torch.is_grad_enabled()
