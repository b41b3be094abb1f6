"""Pre-norm transformer block with LayerScale and stochastic depth on each residual branch."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dinokit.models.layers.attention import Attention
from dinokit.models.layers.ffn import Mlp, SwiGLUFFN, saves_for_backward, swiglu_hidden_dim
from dinokit.models.layers.layer_scale import LayerScale
from dinokit.models.layers.stochastic_depth import drop_add_residual


class Block(nn.Module):
    """x = x + ls1(attn(norm1(x))); x = x + ls2(ffn(norm2(x))).

    Each branch is dropped independently with rate `drop_path_rate` during training (the official code
    applies `drop_path1` to both branches for small rates, a known bug its own comment marks). LayerScale is
    absent (Identity) when `init_values` is None, as in DINO v1.

    With gradients on, the branches save less for the backward at the same result: LayerScale is
    folded into proj and fc2 (`scaled_weights`) and the MLP recomputes its GELU (`GeluLinear`). In a
    DINOv2 ViT-S/14 training step (bf16, `bench/train_throughput.py`'s crops) the backbone's saved
    activations fall from 1.5 to 1.2 GB, at the same speed.

    With `checkpointing` (`VisionTransformer.set_activation_checkpointing`) and gradients on, the block
    keeps only its input for the backward and runs its forward again there (activation checkpointing).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        hidden = int(dim * mlp_ratio)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, hidden, bias=ffn_bias)
        elif ffn_layer in ("swiglu", "swiglufused"):
            self.mlp = SwiGLUFFN(dim, swiglu_hidden_dim(hidden), bias=ffn_bias)
        else:
            raise ValueError(f"ffn_layer must be 'mlp' or 'swiglu', got {ffn_layer!r}")
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path_rate = drop_path_rate
        self.checkpointing = False

    def attention_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_layer_scale():
            return self.attn(self.norm1(x), gain=self.ls1.gamma)
        return self.ls1(self.attn(self.norm1(x)))

    def ffn_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_layer_scale():
            return self.mlp(self.norm2(x), gain=self.ls2.gamma)
        return self.ls2(self.mlp(self.norm2(x)))

    def fold_layer_scale(self) -> bool:
        """Whether LayerScale runs folded into the linear before it (`scaled_weights`): whenever
        gradients are on (`saves_for_backward`), where it saves memory. Without gradients the
        branch computes linear(x) * gamma as written: inference matches the official models bit for bit."""
        return isinstance(self.ls1, LayerScale) and saves_for_backward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D). With `checkpointing`: torch.utils.checkpoint, non-reentrant, inside the
        block, so that `block.compile()` traces it (as torch supports: checkpoint, then compile, then
        FSDP2's fully_shard of the block) and the module names stay as they are. The recomputation
        draws the same drop-path samples: checkpoint restores the RNG state first (preserve_rng_state)."""
        if self.checkpointing and saves_for_backward():
            return checkpoint(self.residual_branches, x, use_reentrant=False)
        return self.residual_branches(x)

    def residual_branches(self, x: torch.Tensor) -> torch.Tensor:
        rate = self.drop_path_rate if self.training else 0.0
        x = drop_add_residual(x, self.attention_branch, rate)
        return drop_add_residual(x, self.ffn_branch, rate)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference forward that also returns this block's attention probabilities (B, heads, T, T)."""
        out, attn = self.attn(self.norm1(x), return_attention=True)
        x = x + self.ls1(out)
        return x + self.ls2(self.mlp(self.norm2(x))), attn
