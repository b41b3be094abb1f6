"""Bicubic resampling of the position grid written as two matrix products, for exported graphs.

Eager models resample the stored position grid with `F.interpolate` and return it untouched at the
native grid (a Python `if` on the input size). A traced or exported graph cannot keep that `if`, and
`F.interpolate` with a size-dependent scale factor is frozen to the example size. Here the same
resampling is expressed as out = Wh @ grid @ Ww^T, with the weight matrices computed from the output
size by tensor operations, so one graph serves every input size. It reproduces `F.interpolate` (to
float32 rounding, tested) in both of the official modes:

- bicubic, A = -0.75, source index (dst + 0.5) * scale - 0.5, neighbours clamped at the border
  (`upsample_bicubic2d`);
- antialiased bicubic, A = -0.5, support 2 * max(scale, 1), weights normalised over the pixels inside
  the image (`_upsample_bicubic2d_aa`, PIL's filter).

`scale` is input / output pixels: 1 / scale_factor when a scale factor is given (the official
`interpolate_offset` path), else stored / wanted.
"""

import torch


def cubic_kernel(x: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel with parameter `a`, evaluated elementwise."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_matrix(out_size: int, in_size: int, scale: float, antialias: bool) -> torch.Tensor:
    """(out_size, in_size) float32 matrix W with W @ signal == 1-D bicubic resampling of `signal`."""
    dst = torch.arange(out_size, dtype=torch.float32).unsqueeze(1)  # (out, 1)
    src = torch.arange(in_size, dtype=torch.float32).unsqueeze(0)  # (1, in)
    scale = torch.ones(()) * scale  # a tensor also when `scale` is symbolic (export)
    if antialias:
        support_scale = torch.clamp(scale, min=1.0)  # widen the filter only when shrinking
        centre = scale * (dst + 0.5)
        weights = cubic_kernel((src - centre + 0.5) / support_scale, a=-0.5)
        # the eager kernel leaves a dimension whose size does not change untouched, whatever the scale
        return identity_if_same_size(weights / weights.sum(dim=1, keepdim=True))
    position = scale * (dst + 0.5) - 0.5
    base = torch.floor(position)
    t = position - base
    weights = torch.zeros(out_size, in_size)
    for tap in (-1, 0, 1, 2):  # four neighbours, indices clamped to the border as in the eager kernel
        index = torch.clamp(base + tap, 0, in_size - 1)
        weights = weights + cubic_kernel(t - tap, a=-0.75) * (src == index).float()
    return weights


def identity_if_same_size(weights: torch.Tensor) -> torch.Tensor:
    """(out, in) `weights`, or the identity when out == in: a choice made in the graph, not in Python."""
    return torch.where(same_size(weights), identity(weights), weights)


def same_size(weights: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: does this (out, in) resampling matrix keep the size?"""
    return torch.arange(weights.shape[0])[-1] == weights.shape[1] - 1


def identity(weights: torch.Tensor) -> torch.Tensor:
    """The (out, in) matrix with ones where row == column."""
    return (torch.arange(weights.shape[0]).unsqueeze(1) == torch.arange(weights.shape[1])).float()


def resample_grid(
    grid: torch.Tensor, out_h: int, out_w: int, scale_h: float, scale_w: float, antialias: bool, keep_if_same: bool
) -> torch.Tensor:
    """Resample (C, H, W) `grid` to (C, out_h, out_w) as Wh @ grid @ Ww^T. With `keep_if_same` the grid
    comes back exactly (identity matrices, chosen in-graph) when out_h, out_w == H, W, as the eager
    model returns its stored grid at the native size."""
    wh = bicubic_matrix(out_h, grid.shape[-2], scale_h, antialias)
    ww = bicubic_matrix(out_w, grid.shape[-1], scale_w, antialias)
    if keep_if_same:
        unchanged = same_size(wh) & same_size(ww)
        wh = torch.where(unchanged, identity(wh), wh)
        ww = torch.where(unchanged, identity(ww), ww)
    return wh @ grid.float() @ ww.T
