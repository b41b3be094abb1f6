"""Multi-head self-attention through `torch.nn.functional.scaled_dot_product_attention`, or through two
matrix products and a softmax where that is faster: on CPU in bf16, for training everywhere and for
inference on CPUs without matrix tiles.

PyTorch's fused CPU attention is slow in reduced precision, except in the forward on CPUs with AMX
tiles. Measured by `bench/cpu_training_speed.py` and throwaway probes of the same shapes:
- on an AVX512-BF16 CPU without AMX (AMD EPYC), the matmul path is 11x / 4.6x / 2.0x faster than SDPA
  for forward + backward at 17 / 65 / 257 tokens (128 x 3 heads of 32, 128 x 3 of 32, 16 x 6 of 64),
  and 2.1x faster for inference at 257 tokens (3 x 6 heads of 64);
- on an Intel Xeon with AMX, it is still 5.0x / 5.1x / 1.8x faster for forward + backward, but SDPA
  is the faster inference: 1.2x at 3 x 6 x 257, 2.6x at 32 x 6 x 257, 3.8x at 2 x 12 x 1370 tokens
  (1.2x slower only at 128 x 3 x 17).
Its logits are rounded to bf16 before the softmax, as in transformers' eager attention under
autocast; a ViT-S/14's CLS keeps a cosine of 0.99999 to fp32 either way. In fp32, in fp16 (whose
matrix products these CPUs run slowly: SDPA is 2-8x faster than the matmul path there) and on GPUs,
SDPA is used.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.models.layers.layer_scale import scaled_linear


class Attention(nn.Module):
    """qkv = Linear(D, 3D) with rows ordered [q; k; v] (the official layout), SDPA, then proj.

    `forward(x, return_attention=True)` computes softmax(q k^T / sqrt(d)) explicitly and returns it too
    (B, heads, T, T): the path used for attention maps, since fused SDPA kernels do not expose it.
    `forward(x, gain=g)` returns proj(...) * g with the gain folded into proj (`scaled_linear`): the
    block's LayerScale during training.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, return_attention: bool = False, gain: torch.Tensor | None = None):
        b, n, d = x.shape
        # each (B, heads, N, d_head), a view of qkv's output: unbound at the q/k/v axis, then transposed,
        # the backward stacks their gradients straight into that output's layout (permuting first and
        # unbinding at 0 stacked them as (3, B, heads, N, d_head) and copied that once more)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        if return_attention:
            scale = q.shape[-1] ** -0.5
            with torch.autocast(q.device.type, enabled=False):  # float32 under a caller's autocast too
                attn = (q.float() @ k.float().transpose(-2, -1) * scale).softmax(dim=-1)
            out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, d)
            return scaled_linear(out, self.proj, gain), attn
        out = matmul_attention(q, k, v) if use_matmul_attention(q) else F.scaled_dot_product_attention(q, k, v)
        return scaled_linear(out.transpose(1, 2).reshape(b, n, d), self.proj, gain)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head)) v for q, k, v (B, heads, N, d_head), as two batched matrix products.

    The scale is applied inside the first product (its fp32 accumulator). The softmax is computed in
    fp32 and rounded once to the inputs' dtype either way. For rows of 32 tokens or more PyTorch's CPU
    kernel does that on the bf16 tensor directly: forward + backward at 16 x 6 heads x 257 tokens took
    72 ms with a cast to fp32 and back, 42 ms without (`bench/cpu_training_speed.py`, before and
    after). For shorter rows the cast is the faster route (5.7 vs 7.7 ms at 384 x 3 heads x 17).
    """
    b, h, n, dh = q.shape
    q, k, v = (t.reshape(b * h, n, dh) for t in (q, k, v))
    logits = torch.baddbmm(q.new_empty(b * h, n, n), q, k.transpose(1, 2), beta=0.0, alpha=dh**-0.5)
    short_rows = n < 32
    probabilities = logits.softmax(dim=-1, dtype=torch.float32 if short_rows else None).to(logits.dtype)
    return (probabilities @ v).view(b, h, n, dh)


def use_matmul_attention(q: torch.Tensor) -> bool:
    """Whether attention on `q` (B, heads, N, d_head) takes `matmul_attention`, the faster path for it:
    on CPU in bf16 when it is differentiated (training), or on any CPU without AMX tiles."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return False
    return q.requires_grad or not cpu_has_amx()


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), whose bf16 matrix units run
    PyTorch's fused CPU attention faster than `matmul_attention` in the forward (module docstring)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, present since torch 2.3
    return bool(probe is not None and probe())
