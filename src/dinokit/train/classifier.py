"""The fine-tuned classifier: a backbone and one linear head on its final normed features, with the
AdamW groups of ViT fine-tuning (layer-wise lr decay, no weight decay on biases, norms, LayerScale
and tokens)."""

import torch
from torch import nn

from dinokit.eval.linear import linear_input
from dinokit.models import VisionTransformer
from dinokit.train.optim import param_groups


class Classifier(nn.Module):
    """images (B, 3, H, W) -> logits (B, C) = head(x), x the final normed CLS (B, D), or with `avgpool`
    cat(CLS, mean of the normed patch tokens) (B, 2D): the input of eval linear's heads at
    n_last_blocks=1 (`dinokit.eval.linear.linear_input`). The head's weight is trunc-normal with std
    `init_std` (MAE: 2e-5), its bias 0."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, avgpool: bool = False, init_std: float = 2e-5):
        super().__init__()
        self.backbone, self.avgpool = backbone, avgpool
        self.head = nn.Linear(backbone.embed_dim * (2 if avgpool else 1), num_classes)
        nn.init.trunc_normal_(self.head.weight, std=init_std)
        nn.init.zeros_(self.head.bias)
        if backbone.mask_token is not None:  # used by masked pretraining only: no gradient here (DDP)
            backbone.mask_token.requires_grad_(False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(images)
        return linear_input(f["x_norm_clstoken"].unsqueeze(1), f["x_norm_patchtokens"].mean(dim=1), 1, self.avgpool)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def finetune_groups(model: Classifier, layer_decay: float) -> list[dict]:
    """AdamW groups (`dinokit.train.optim.param_groups`): head and final norm lr x 1, block i
    x decay^(L - i), patch embed, CLS, position embedding and registers x decay^(L + 1); weight decay
    multiplier 0 for biases, norms, LayerScale gammas and tokens, 1 for the rest."""
    return param_groups(
        model.backbone, {"head": model.head}, layer_decay, patch_embed_lr_mult=1.0, no_decay_tokens=True
    )
