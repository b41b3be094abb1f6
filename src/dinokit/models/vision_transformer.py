"""The DINO / DINOv2 Vision Transformer: one model class for every released variant.

Token layout: [CLS, REG x R, PATCH x N]. Registers carry no position embedding; the mask token replaces
masked patch embeddings before the position embedding is added (as the official code). Outputs follow
the official models: `forward_features` returns the `x_norm_*` dict, `forward` the normed CLS token, and
`get_intermediate_layers` the last-n (or chosen) blocks.
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.errors import DinokitError, ModelInputError
from dinokit.models.layers import Block, PatchEmbed
from dinokit.models.layers.attention import cpu_has_amx
from dinokit.models.layers.position_interpolation import resample_grid


def is_tracing() -> bool:
    """True inside torch.jit.trace, torch.export and the ONNX exporter: code must then not branch on
    input sizes in Python."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


@dataclass(frozen=True)
class ViTConfig:
    """Everything that defines the architecture (argument names as the official `DinoVisionTransformer`).

    `img_size` fixes the stored position grid (img_size / patch_size per side); any other input size is
    served by interpolating it, with `interpolate_offset` / `interpolate_antialias` exactly as the
    official model (0.1 / False for DINO v1 and DINOv2, 0.0 / True for the register variants).
    `init_values` is the LayerScale init; None means no LayerScale (DINO v1). `mask_token` adds the
    learned token that replaces masked patches (iBOT); DINO v1 has none.
    """

    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    init_values: float | None = 1.0
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False
    norm_eps: float = 1e-6
    mask_token: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def rectangular_grid_error(found: str) -> DinokitError:
    """The error for weights of a model built for a rectangular image size (`found` says how it shows),
    which no ViTConfig describes: the stored position grid is square, as in the official model."""
    return DinokitError(
        f"{found}: these weights were made for a rectangular image size (e.g. timm's img_size=(224, 280)). "
        "dinokit's VisionTransformer, as the official DINO / DINOv2 model, stores a square position grid "
        "(img_size / patch_size per side) and resamples it for every other input size, so it cannot hold "
        "them exactly. Build the model with a square img_size (timm: img_size=224, with dynamic_img_size=True "
        "for other input sizes; transformers: image_size=224) and save it again, or resample its position "
        "embeddings to a square grid (e.g. timm.layers.resample_abs_pos_embed) and state that size: the "
        "outputs then differ slightly from those of the rectangular grid."
    )


def drop_path_rates(rate: float, depth: int, uniform: bool = False) -> list[float]:
    """Per-block stochastic depth: `rate` everywhere (uniform, DINOv2's recipes), else rising linearly
    from 0 at the first block to `rate` at the last."""
    return [rate] * depth if uniform else [rate * i / max(depth - 1, 1) for i in range(depth)]


class VisionTransformer(nn.Module):
    """DINOv2 / DINO ViT. (B, 3, H, W) with H, W multiples of the patch size -> normed CLS (B, D)."""

    def __init__(self, config: ViTConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = config if config is not None else ViTConfig(**kwargs)
        if config is not None and kwargs:
            cfg = ViTConfig(**{**cfg.to_dict(), **kwargs})
        self.config = cfg
        d = cfg.embed_dim
        self.embed_dim = self.num_features = d
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        self.interpolate_offset = cfg.interpolate_offset
        self.interpolate_antialias = cfg.interpolate_antialias

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        grid = cfg.img_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d)) if cfg.num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, d)) if cfg.mask_token else None

        rates = drop_path_rates(cfg.drop_path_rate, cfg.depth, cfg.drop_path_uniform)
        self.blocks = nn.ModuleList(
            Block(
                d,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                ffn_layer=cfg.ffn_layer,
                qkv_bias=cfg.qkv_bias,
                proj_bias=cfg.proj_bias,
                ffn_bias=cfg.ffn_bias,
                init_values=cfg.init_values,
                drop_path_rate=rate,
                norm_eps=cfg.norm_eps,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Identity()
        self.cpu_inference_tokens = 4096 if cpu_has_amx() else 1024  # run_blocks: the faster slice on each kind of CPU
        if not self.cls_token.is_meta:  # a shape-only model (load_model, `dinokit models`) has nothing to draw
            self.init_weights()

    def set_drop_path(self, rate: float, uniform: bool = False) -> None:
        """Stochastic depth for training (`drop_path_rates`), whatever the config was built with."""
        for block, block_rate in zip(self.blocks, drop_path_rates(rate, len(self.blocks), uniform), strict=True):
            block.drop_path_rate = block_rate

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing for training: with gradients on, each block keeps only its input
        (B, N, D) for the backward and recomputes its activations there (`Block.forward`): less memory
        for one more forward of the blocks. The same results and gradients; names and state-dict keys
        unchanged."""
        for block in self.blocks:
            block.checkpointing = enabled

    def init_weights(self) -> None:
        """Official init: pos_embed and Linear weights trunc_normal(0.02), CLS and registers normal(1e-6)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------- tokens
    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """Position embedding (1, 1 + N, D) for an input of `height` x `width` pixels.

        Bicubic resampling of the stored M x M grid in float32. With `interpolate_offset` the target is
        given as scale_factor (h0 + offset) / M (the official "historical kludge"), otherwise as size.
        While tracing or exporting, the same resampling runs as matrix products that hold for every input
        size (`layers.position_interpolation`); eager numerics are unchanged.
        """
        pos = self.pos_embed
        h0, w0 = height // self.patch_size, width // self.patch_size
        if is_tracing():
            return torch.cat([pos[:, :1].float(), self.traceable_pos_grid(h0, w0)], dim=1).to(pos.dtype)
        stored = pos.shape[1] - 1
        if num_patches == stored and height == width:
            return pos
        m = int(math.sqrt(stored))
        if m * m != stored:
            raise ValueError(f"stored position grid of {stored} patches is not square")
        grid = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((h0 + self.interpolate_offset) / m, (w0 + self.interpolate_offset) / m)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=self.interpolate_antialias)
        if grid.shape[-2:] != (h0, w0):
            raise RuntimeError(f"position grid interpolated to {tuple(grid.shape[-2:])}, expected {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([pos[:, :1].float(), grid], dim=1).to(pos.dtype)

    def traceable_pos_grid(self, h0: int, w0: int) -> torch.Tensor:
        """Patch position embeddings (1, h0 * w0, D) as `interpolate_pos_encoding` computes them, by
        operations that trace for any size (the stored grid itself, exactly, at the native size)."""
        pos = self.pos_embed
        m = self.config.img_size // self.patch_size  # the stored grid's side (a constant in the graph)
        grid = pos[0, 1:].float().reshape(m, m, -1).permute(2, 0, 1)
        if self.interpolate_offset:
            scale_h, scale_w = m / (h0 + self.interpolate_offset), m / (w0 + self.interpolate_offset)
        else:
            scale_h, scale_w = m / h0, m / w0
        grid = resample_grid(grid, h0, w0, scale_h, scale_w, self.interpolate_antialias, keep_if_same=True)
        return grid.permute(1, 2, 0).reshape(1, h0 * w0, -1)

    def check_images(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the model takes it: a float batch (B, C, H, W) on the weights' device, cast to the
        weights' dtype (as transformers' Dinov2Model does; `model.half()` then takes float32 images).
        Anything else raises a ModelInputError naming the fix (PIL images, uint8 pixels, (B, H, W, C))."""
        channels, weight = self.patch_embed.proj.in_channels, self.patch_embed.proj.weight
        transform = "dinokit.eval_transform(size, patch_size=model.patch_size)"
        if not isinstance(x, torch.Tensor):
            raise ModelInputError(
                f"the model takes a batch of normalised image tensors (B, {channels}, H, W), got a "
                f"{type(x).__module__}.{type(x).__name__}: {transform} turns a PIL image, a numpy (H, W, 3) "
                "uint8 array or a uint8 tensor into one image (3, H, W); torch.stack([transform(image) for image "
                "in images]) makes the batch"
            )
        if not x.is_floating_point():
            raise ModelInputError(
                f"images of dtype {x.dtype} (pixel values?): the model takes float images normalised with the "
                "ImageNet mean and std. dinokit.data.transforms.normalize()(images) does that to uint8 images "
                f"(3, H, W) or (B, 3, H, W) at their size; {transform}(images) also resizes and crops them"
            )
        if x.ndim != 4 or x.shape[1] != channels:
            hint = ""
            if x.ndim == 3:
                hint = ": one image needs images.unsqueeze(0)"
            elif x.ndim == 4 and x.shape[-1] == channels:
                hint = ": channels last (B, H, W, C) needs images.permute(0, 3, 1, 2)"
            elif x.ndim == 4 and x.shape[1] == 1:
                hint = ": grayscale images need 3 channels (PIL: image.convert('RGB') before the transform)"
            raise ModelInputError(f"images must be a batch (B, {channels}, H, W), got {tuple(x.shape)}{hint}")
        if x.device != weight.device and not weight.is_meta:
            raise ModelInputError(
                f"images are on {x.device} and the model on {weight.device}: move them to the model's device, "
                "images.to(next(model.parameters()).device), or the model to theirs, model.to(images.device)"
            )
        return x.to(weight.dtype)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) [+ bool masks (B, N)] -> tokens (B, 1 + R + N, D); `check_images` first."""
        x = self.check_images(x)
        b, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask token; build it with mask_token=True to use masks")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        # the official concatenation: its type promotion makes the token stream fp32 under autocast, where
        # the patch embedding gives bf16, so that every residual add accumulates in fp32
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        return x

    def run_blocks(self, tokens: torch.Tensor, keep: Sequence[int] = (-1,)) -> dict[int, torch.Tensor]:
        """Run the blocks up to the last index in `keep` and return {index: output tokens} for `keep`.

        Inference on CPU runs the batch in slices of about `cpu_inference_tokens` tokens: activations
        then stay in cache; each sample goes through exactly the same operations. In bf16 on a 2-core
        CPU (bench/inference.py, ViT-S/14 at 224 px) slices of 1024 tokens are 10-30% faster than none
        on an AMD EPYC; on an Intel Xeon with AMX slices of 4096 are (a batch of 64: 68.6 img/s,
        against 48.2 with slices of 16384 and 43.6 unsliced; a batch of 32: 44-49 with 1024).
        """
        depth = len(self.blocks)
        keep = sorted({i % depth for i in keep})
        if tokens.device.type == "cpu" and not torch.is_grad_enabled() and not is_tracing():
            step = max(1, self.cpu_inference_tokens // tokens.shape[1])
            if tokens.shape[0] > step:
                slices = [self.run_blocks(chunk, keep) for chunk in tokens.split(step)]
                return {i: torch.cat([out[i] for out in slices]) for i in keep}
        outputs = {}
        for i, blk in enumerate(self.blocks[: keep[-1] + 1]):
            tokens = blk(tokens)
            if i in keep:
                outputs[i] = tokens
        return outputs

    # ----------------------------------------------------------------------------------- outputs
    def forward_features(self, x: torch.Tensor | list[torch.Tensor], masks=None) -> dict | list[dict]:
        """Dict with x_norm_clstoken (B, D), x_norm_regtokens (B, R, D), x_norm_patchtokens (B, N, D),
        x_prenorm (B, 1 + R + N, D) and masks. A list of inputs (e.g. global and local crops, which
        differ in size) gives a list of dicts, with `masks` a matching list."""
        if isinstance(x, list):
            masks = masks if masks is not None else [None] * len(x)
            return [self.forward_features(xi, mi) for xi, mi in zip(x, masks, strict=True)]
        tokens = self.run_blocks(self.prepare_tokens(x, masks))[len(self.blocks) - 1]
        normed = self.norm(tokens)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : 1 + r],
            "x_norm_patchtokens": normed[:, 1 + r :],
            "x_prenorm": tokens,
            "masks": masks,
        }

    def forward(self, x: torch.Tensor, is_training: bool = False):
        out = self.forward_features(x)
        return out if is_training else self.head(out["x_norm_clstoken"])

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens of the last `n` blocks (int, 1 <= n <= depth) or of the blocks indexed by `n`
        (list; negative indices count from the end).

        Each output is (B, N, D), or (B, D, H/p, W/p) with `reshape`; with `return_class_token` each
        entry is a (patch_tokens, cls_token) pair. `norm` applies the final LayerNorm.

        This is the DINOv2 method, for DINO v1 models too. DINO v1's own returned every token, CLS
        first, so its evaluation code reads `out[:, 0]` as the CLS; here that is the first patch:
        ask for `return_class_token=True` and read each pair's second entry. A list `n` returns the
        blocks in the order asked (the official code sorts them).
        """
        depth = len(self.blocks)
        if isinstance(n, int) and not 1 <= n <= depth:
            raise DinokitError(
                f"get_intermediate_layers(n={n}) asks for the last {n} blocks of a {depth}-block model; "
                f"pass 1 <= n <= {depth}, or a list of block indices such as [0, -1]"
            )
        wanted = list(range(depth - n, depth)) if isinstance(n, int) else list(n)
        if not wanted or not all(-depth <= i < depth for i in wanted):
            raise DinokitError(
                f"get_intermediate_layers(n={n}): block indices must lie in -{depth}..{depth - 1} for a "
                f"{depth}-block model (negative ones count from the end)"
            )
        wanted = [i % depth for i in wanted]
        b, _, h, w = self.check_images(x).shape
        per_block = self.run_blocks(self.prepare_tokens(x), keep=wanted)
        outputs = [self.norm(per_block[i]) if norm else per_block[i] for i in wanted]
        r = self.num_register_tokens
        class_tokens = [o[:, 0] for o in outputs]
        patches = [o[:, 1 + r :] for o in outputs]
        if reshape:
            p = self.patch_size
            patches = [o.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens, strict=True))
        return tuple(patches)

    def get_selfattention(self, x: torch.Tensor, block: int = -1) -> torch.Tensor:
        """Attention probabilities (B, heads, T, T) of one block, T = 1 + R + N (registers included;
        `attention_to_patches` drops them). Computed explicitly in float32."""
        block = block % len(self.blocks)
        tokens = self.prepare_tokens(x)
        if block > 0:
            tokens = self.run_blocks(tokens, keep=[block - 1])[block - 1]
        return self.blocks[block].forward_with_attention(tokens)[1]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Last block's attention (B, heads, T, T), the DINO v1 `get_last_selfattention` convention."""
        return self.get_selfattention(x, -1)

    # ----------------------------------------------------------------------------------- helpers
    @classmethod
    def from_pretrained(cls, source: str, **kwargs) -> "VisionTransformer":
        """Any file, folder or released name that `dinokit.load_model` reads (HF-style entry point)."""
        from dinokit.models.loading import load_model

        return load_model(source, **kwargs)

    def save_pretrained(self, path: str) -> str:
        """Write dinokit safetensors (weights + architecture): `path` itself if it ends in .safetensors,
        else `path`/model.safetensors, which from_pretrained(path) reads back; returns the file path."""
        from dinokit.models.loading import export_model

        return export_model(self, path, format="dinokit")

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size


def attention_to_patches(attn: torch.Tensor, num_register_tokens: int) -> dict[str, torch.Tensor]:
    """Split (B, heads, T, T) attention into what the CLS token attends to.

    Returns cls_to_patches (B, heads, N) with registers dropped, cls_to_registers (B, heads, R) and
    registers_to_patches (B, heads, R, N).
    """
    r = num_register_tokens
    return {
        "cls_to_patches": attn[:, :, 0, 1 + r :],
        "cls_to_registers": attn[:, :, 0, 1 : 1 + r],
        "registers_to_patches": attn[:, :, 1 : 1 + r, 1 + r :],
    }


def snap_to_patch_multiple(x: torch.Tensor, patch_size: int, mode: str = "crop") -> torch.Tensor:
    """Center-crop (mode='crop') or zero-pad symmetrically (mode='pad', the official `CenterPadding`)
    an image batch (..., H, W) so that both sides are multiples of `patch_size`."""
    h, w = x.shape[-2:]
    if mode == "crop":
        nh, nw = h // patch_size * patch_size, w // patch_size * patch_size
        if nh == 0 or nw == 0:
            raise ValueError(f"image {h}x{w} is smaller than one patch ({patch_size}); use mode='pad'")
        top, left = (h - nh) // 2, (w - nw) // 2
        return x[..., top : top + nh, left : left + nw]
    if mode == "pad":
        ph, pw = -h % patch_size, -w % patch_size
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
