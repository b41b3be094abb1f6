"""Building blocks of the Vision Transformer, one concept per file (as the official `dinov2/layers`)."""

from dinokit.models.layers.attention import Attention
from dinokit.models.layers.block import Block
from dinokit.models.layers.ffn import Mlp, SwiGLUFFN
from dinokit.models.layers.layer_scale import LayerScale
from dinokit.models.layers.patch_embed import PatchEmbed
from dinokit.models.layers.stochastic_depth import drop_add_residual

__all__ = ["Attention", "Block", "LayerScale", "Mlp", "PatchEmbed", "SwiGLUFFN", "drop_add_residual"]
