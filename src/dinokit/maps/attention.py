"""Last-block CLS attention maps, register-aware, and DINO's thresholded attention-mass maps.

In the last block the CLS token's attention row sums to 1 over [CLS, registers, patches]. The maps
show the patch part (registers dropped, so that their often large share does not wash out the map);
the share each register takes, and where each register itself looks, are returned separately.
"""

import numpy as np
import torch

from dinokit.models import VisionTransformer, attention_to_patches


@torch.inference_mode()
def attention_maps(model: VisionTransformer, image: torch.Tensor, mass: float = 0.6) -> dict[str, np.ndarray]:
    """Attention of the CLS token in the last block for one image (3, H, W) or (1, 3, H, W), wherever it is
    (it moves to the model's device; the arrays come back on the CPU).

    Returns (h, w = H/p, W/p; R registers):
      per_head (heads, h, w)      CLS -> patch attention
      mean (h, w)                 its average over heads
      cls_to_cls (heads,)         CLS -> itself
      cls_to_registers (heads, R) CLS -> each register (per_head + cls_to_cls + this sum to 1 per head)
      registers_to_patches (R, h, w) each register's attention over the patches, averaged over heads
      mass_masks (heads, h, w)    bool: the fewest patches holding `mass` of each head's patch
                                  attention (DINO's visualize_attention.py `threshold`)
    """
    x = model_batch(model, image)
    h, w = model.grid_size(*x.shape[-2:])
    attn = model.get_last_selfattention(x)[0:1].float().cpu()  # (1, heads, T, T), off the model's device
    parts = attention_to_patches(attn, model.num_register_tokens)
    per_head = parts["cls_to_patches"][0]  # (heads, N)
    return {
        "per_head": per_head.reshape(-1, h, w).numpy(),
        "mean": per_head.mean(0).reshape(h, w).numpy(),
        "cls_to_cls": attn[0, :, 0, 0].numpy(),
        "cls_to_registers": parts["cls_to_registers"][0].numpy(),
        "registers_to_patches": parts["registers_to_patches"][0].mean(0).reshape(-1, h, w).numpy(),
        "mass_masks": attention_mass_masks(per_head, mass).reshape(-1, h, w).numpy(),
    }


def model_batch(model: VisionTransformer, image: torch.Tensor) -> torch.Tensor:
    """One image (3, H, W) or (1, 3, H, W), from eval_transform on the CPU, as a batch (1, 3, H, W) on
    the model's device, as the maps return their arrays on the CPU whatever the model's device; what
    the model cannot take (a PIL image, ...) gets its ModelInputError."""
    if isinstance(image, torch.Tensor):
        image = (image.unsqueeze(0) if image.ndim == 3 else image).to(next(model.parameters()).device)
    return model.check_images(image)


def attention_mass_masks(attention: torch.Tensor, mass: float) -> torch.Tensor:
    """(heads, N) attention -> (heads, N) bool: per head, the largest entries whose share of the row's
    total first reaches `mass` (sort ascending, cumulative share > 1 - mass, as DINO)."""
    values, order = torch.sort(attention, dim=1)
    share = values / values.sum(dim=1, keepdim=True)
    keep_sorted = torch.cumsum(share, dim=1) > 1 - mass
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
