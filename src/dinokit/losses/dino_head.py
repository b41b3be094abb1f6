"""The DINO projection head (`dinov2/layers/dino_head.py`), shared by the DINO and iBOT objectives."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """x (.., in_dim) -> logits (.., out_dim) over `out_dim` prototypes.

        h = MLP(x)                     Linear(in, hidden)-GELU-[Linear(hidden, hidden)-GELU]-Linear(hidden, bottleneck)
        z = h / max(||h||_2, eps)      (eps 1e-6 in fp16, else 1e-12)
        logits = W z                   W_k = g_k v_k / ||v_k||: weight-normalised rows, g initialised to 1

    `nlayers` counts the MLP's linear layers (1 = a single Linear(in, bottleneck)). MLP weights are
    trunc_normal(std 0.02) with zero biases; the last layer keeps PyTorch's default init, as the
    official code. `norm_last_layer=True` freezes g at 1 (DINO v1's default: prototypes stay unit
    vectors); DINOv2 trains g (and gives it weight decay). The weight norm is
    `torch.nn.utils.parametrizations.weight_norm`: g is `last_layer.parametrizations.weight.original0`,
    v is `...original1`.

    Precision: the head runs in the autocast dtype, bf16 by default, where the official code runs it in
    fp16. bf16 rounds the logits (|logit| <= g, about 1) by up to ~2e-3: at teacher temperature 0.04 that
    moves a teacher probability by up to ~6% of itself (fp16: ~0.8%), a KL of ~5e-5 nats to the float32
    targets over 65536 prototypes (bench/head_precision.py), noise next to a loss of ~10 nats. Losses, centers,
    Sinkhorn-Knopp and KoLeo are float32 from these logits on; `precision=fp32` runs the head in float32.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = False,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), dim=0)
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
