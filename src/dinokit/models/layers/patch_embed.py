"""Image to patch tokens: a strided convolution, as in every ViT."""

import torch
from torch import nn

from dinokit.errors import ModelInputError


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping `patch_size` squares and project each to `embed_dim`.

    (B, C, H, W) -> (B, H/p * W/p, D). H and W must be multiples of the patch size; the error
    names the nearest sizes that are (see `dinokit.models.snap_to_patch_multiple`).
    """

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 384) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ModelInputError(
                f"Input size {h}x{w} is not a multiple of the patch size {p}. Use "
                f"{h // p * p}x{w // p * p} (crop) or {-(-h // p) * p}x{-(-w // p) * p} (pad), e.g. "
                "dinokit.models.snap_to_patch_multiple(x, patch_size, mode='crop'|'pad')."
            )
        return self.proj(x).flatten(2).transpose(1, 2)
