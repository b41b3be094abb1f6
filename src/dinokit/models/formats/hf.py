"""Hugging Face `transformers` layout: `Dinov2Model`, `Dinov2WithRegistersModel`, `ViTModel` (DINO v1 on
the Hub: facebook/dino-vit{s,b}{16,8}) and their `*ForImageClassification` wrappers, as `config.json` +
`model.safetensors` / `pytorch_model.bin`.

Key mapping from `convert_dinov2_to_hf.py`: q, k, v are separate Linear layers in HF and one `qkv`
in the official layout. Files hold the legacy names (`attention.attention.query`); transformers 5 names
the same tensors `attention.q_proj` in memory, and both are read here. `ViTModel` names its block parts
`layernorm_before` / `layernorm_after` / `intermediate.dense` / `output.dense` (in memory: `layers.{i}.`,
`mlp.fc1` / `mlp.fc2`) and has a `pooler`, which is no part of the backbone.
"""

import re

import torch

from dinokit.errors import DinokitError
from dinokit.models.architectures import mlp_ratio_for_width
from dinokit.models.vision_transformer import ViTConfig, rectangular_grid_error

_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Per-layer renames (HF suffix -> official suffix); both legacy and transformers-5 names.
_LAYER = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
    "layernorm_before": "norm1",  # ViTModel
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_QKV = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}
_GATE_UP = {"mlp.gate_proj": "gate", "mlp.up_proj": "up"}
_BACKBONE_PREFIXES = ("dinov2_with_registers.", "dinov2.", "vit.")
_NOT_BACKBONE = ("classifier.", "pooler.")  # a wrapper's classifier, ViTModel's pooler
# A block's keys: `encoder.layer.{i}.` in files (and in memory for Dinov2), `layers.{i}.` in a live ViTModel
_LAYER_KEY = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
# model_type -> (registers, LayerScale + mask token) of the transformers class
MODEL_TYPES = {"dinov2": (False, True), "dinov2_with_registers": (True, True), "vit": (False, False)}


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict (backbone or ForImageClassification) -> official names. Unknown keys are kept
    unchanged so that the caller can report them."""
    out, parts = {}, {}
    for key, value in sd.items():
        key = _backbone_key(key)
        if key.startswith(_NOT_BACKBONE):
            continue
        if key == "embeddings.register_tokens" and value.shape[1] == 0:
            continue  # a Dinov2WithRegistersModel with 0 registers (dinokit's export of offset-0 + antialias models)
        if key in _EMBEDDINGS:
            out[_EMBEDDINGS[key]] = value
            continue
        m = _LAYER_KEY.match(key)
        if not m:
            out[key] = value
            continue
        i, name, kind = m.groups()
        kind = "gamma" if kind == "lambda1" else kind
        if name in _LAYER:
            out[f"blocks.{i}.{_LAYER[name]}.{kind}"] = value
        elif name in _QKV:
            parts.setdefault((f"blocks.{i}.attn.qkv.{kind}", "qkv"), {})[_QKV[name]] = value
        elif name in _GATE_UP:
            parts.setdefault((f"blocks.{i}.mlp.w12.{kind}", "gate_up"), {})[_GATE_UP[name]] = value
        else:
            out[key] = value
    for (key, kind), pieces in parts.items():
        order = ("q", "k", "v") if kind == "qkv" else ("gate", "up")
        missing = [p for p in order if p not in pieces]
        if missing:
            raise DinokitError(f"HF weights lack the {missing} part of {key}")
        out[key] = torch.cat([pieces[p] for p in order], dim=0)
    return out


def official_to_hf(sd: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Official names -> HF file names (legacy names, which every transformers version reads).

    HF models always have LayerScale, biases and a mask token; where the dinokit model has none (DINO
    v1, bias-free variants) the neutral value is written (ones, zeros), so the outputs are unchanged.
    """
    sd = dict(sd)
    d = config.embed_dim
    sd.setdefault("mask_token", torch.zeros(1, d))
    if with_registers_class(config):
        sd.setdefault("register_tokens", torch.zeros(1, 0, d))  # 0 registers: written, so none is "missing"
    hidden = sd["blocks.0.mlp.fc1.weight" if config.ffn_layer == "mlp" else "blocks.0.mlp.w3.weight"]
    hidden = hidden.shape[0] if config.ffn_layer == "mlp" else hidden.shape[1]
    for i in range(config.depth):
        sd.setdefault(f"blocks.{i}.ls1.gamma", torch.ones(d))
        sd.setdefault(f"blocks.{i}.ls2.gamma", torch.ones(d))
        sd.setdefault(f"blocks.{i}.attn.qkv.bias", torch.zeros(3 * d))
        sd.setdefault(f"blocks.{i}.attn.proj.bias", torch.zeros(d))
        if config.ffn_layer == "mlp":
            sd.setdefault(f"blocks.{i}.mlp.fc1.bias", torch.zeros(hidden))
            sd.setdefault(f"blocks.{i}.mlp.fc2.bias", torch.zeros(d))
        else:
            sd.setdefault(f"blocks.{i}.mlp.w12.bias", torch.zeros(2 * hidden))
            sd.setdefault(f"blocks.{i}.mlp.w3.bias", torch.zeros(d))
    emb = {v: k for k, v in _EMBEDDINGS.items()}
    layer = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.w12": "mlp.weights_in",
        "mlp.w3": "mlp.weights_out",
    }
    out = {}
    for key, value in sd.items():
        if key in emb:
            out[emb[key]] = value
            continue
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if not m:
            raise DinokitError(f"cannot map {key!r} to the Hugging Face layout")
        i, name, kind = m.groups()
        prefix = f"encoder.layer.{i}."
        if name == "attn.qkv":
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}attention.attention.{part}.{kind}"] = chunk.contiguous()
        elif name in ("ls1", "ls2"):
            out[f"{prefix}layer_scale{name[-1]}.lambda1"] = value
        elif name in layer:
            out[f"{prefix}{layer[name]}.{kind}"] = value
        else:
            raise DinokitError(f"cannot map {key!r} to the Hugging Face layout")
    return out


def is_hf(sd: dict) -> bool:
    """True if any key of `sd` is an HF key name (`is_hf_key`)."""
    return any(is_hf_key(k) for k in sd)


def is_hf_key(key) -> bool:
    """True for an HF key name (`embeddings.*`, `encoder.layer.*`), bare or under a wrapper's backbone
    prefix (`dinov2.`, `dinov2_with_registers.`, `vit.`)."""
    return isinstance(key, str) and _backbone_key(key).startswith(("embeddings.", "encoder.layer."))


def _backbone_key(key: str) -> str:
    """`key` without a ForImageClassification wrapper's backbone prefix (`dinov2.`, ...)."""
    for prefix in _BACKBONE_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads")


def config_from_hf(cfg: dict, source: str = "config.json") -> ViTConfig:
    """ViTConfig of an HF `config.json` (model_type dinov2, dinov2_with_registers or vit); `source` names
    the file in errors.

    Interpolation: `interpolate_offset` / `interpolate_antialias` when the file states them (dinokit
    writes them on export). Otherwise it follows the official model the weights come from: offset 0.1
    without registers (current `Dinov2Model` uses no offset, so it differs from the official model at
    sizes other than its native grid; pass interpolate_offset=0.0 to reproduce transformers), offset 0 +
    antialias with registers (identical to `Dinov2WithRegistersModel`). `ViTModel` (DINO v1) is read as
    the official DINO model: no LayerScale, no mask token, offset 0.1 (transformers' ViTModel, like
    Dinov2Model, resamples with no offset, and only when called with interpolate_pos_encoding=True).
    """
    if not isinstance(cfg, dict):
        raise DinokitError(f"{source} holds a JSON {type(cfg).__name__}, not an object; re-download or re-export it")
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise DinokitError(
            f"{source} has model_type {model_type!r}; dinokit reads {', '.join(repr(t) for t in MODEL_TYPES)}"
        )
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise DinokitError(
            f"{source} lacks {', '.join(repr(k) for k in missing)}, which a {model_type} config.json always has; "
            "re-download the folder or re-export it (dinokit export format=hf)"
        )
    size = cfg.get("image_size")
    if isinstance(size, list) and len(size) == 2:  # transformers takes [height, width] as well as one number
        if size[0] != size[1]:
            raise rectangular_grid_error(
                f"{source}: image_size {size} is not square (transformers resamples the position grid as a "
                "square one: its Dinov2 classes build such a model but fail at every input size)"
            )
        cfg = {**cfg, "image_size": size[0]}
    if cfg.get("hidden_act", "gelu") != "gelu" and not cfg.get("use_swiglu_ffn"):
        raise DinokitError(f"{source}: unsupported hidden_act {cfg['hidden_act']!r} (dinokit's MLP uses exact GELU)")
    try:
        return _vit_config(cfg, *MODEL_TYPES[model_type])
    except (TypeError, ValueError) as e:
        raise DinokitError(f"{source} has a value of the wrong type ({e}); fix or re-export the file") from None


def _vit_config(cfg: dict, with_registers: bool, dinov2: bool) -> ViTConfig:
    """The ViTConfig fields of a config.json whose required keys exist (ValueError on a non-number).
    `dinov2`: a Dinov2 class (LayerScale, mask token, `mlp_ratio`, eps 1e-6 by default); else a ViTModel
    (`intermediate_size`, eps 1e-12 by default, as transformers' classes)."""

    def number(key: str, default, cast):
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} = {value!r} is not a number")
        return cast(value)

    embed_dim = number("hidden_size", None, int)
    # Dinov2 states the MLP ratio, ViTModel the MLP width
    if dinov2:
        mlp_ratio = number("mlp_ratio", 4, float)
    else:
        mlp_ratio = mlp_ratio_for_width(number("intermediate_size", 3072, int), embed_dim)
    return ViTConfig(
        img_size=number("image_size", 518 if dinov2 else 224, int),
        patch_size=number("patch_size", 14 if dinov2 else 16, int),
        in_chans=number("num_channels", 3, int),
        embed_dim=embed_dim,
        depth=number("num_hidden_layers", None, int),
        num_heads=number("num_attention_heads", None, int),
        mlp_ratio=mlp_ratio,
        ffn_layer="swiglu" if cfg.get("use_swiglu_ffn") else "mlp",
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        init_values=number("layerscale_value", 1.0, float) if dinov2 else None,
        num_register_tokens=number("num_register_tokens", 4 if with_registers else 0, int),
        interpolate_offset=number("interpolate_offset", 0.0 if with_registers else 0.1, float),
        interpolate_antialias=bool(cfg.get("interpolate_antialias", with_registers)),
        norm_eps=number("layer_norm_eps", 1e-6 if dinov2 else 1e-12, float),
        mask_token=bool(cfg.get("use_mask_token", True)) and dinov2,
    )


def with_registers_class(config: ViTConfig) -> bool:
    """True if `config` is exported as `Dinov2WithRegistersModel`: models with registers, and models
    that resample the position grid as that class does (offset 0 + antialias, e.g. dinokit's small
    `vit_*`), written with num_register_tokens=0. Others (offset 0.1: DINO, DINOv2) are `Dinov2Model`."""
    return config.num_register_tokens > 0 or (config.interpolate_offset == 0 and config.interpolate_antialias)


def interpolation_mismatch(config: ViTConfig) -> str | None:
    """Why transformers' class for `config` resamples the position grid otherwise than the model (so its
    outputs differ at input sizes other than the native one), or None where they agree."""
    antialias = with_registers_class(config)  # Dinov2WithRegistersModel: size=, antialias; Dinov2Model: size=
    if config.interpolate_offset == 0 and config.interpolate_antialias == antialias:
        return None
    cls = "Dinov2WithRegistersModel" if antialias else "Dinov2Model"
    return (
        f"transformers' {cls} resamples the position grid with no offset and {'with' if antialias else 'no'} "
        f"antialias, this model with offset {config.interpolate_offset} and "
        f"{'with' if config.interpolate_antialias else 'no'} antialias: at input sizes other than "
        f"{config.img_size} px, transformers' outputs will differ from this model's (no transformers class "
        "resamples as it does). dinokit.load_model reads the folder back exactly."
    )


def hf_config(config: ViTConfig) -> dict:
    """`config.json` content that transformers reads as the same network."""
    with_registers = with_registers_class(config)
    cfg = {
        "architectures": ["Dinov2WithRegistersModel" if with_registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if with_registers else "dinov2",
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "mlp_ratio": int(config.mlp_ratio) if float(config.mlp_ratio).is_integer() else config.mlp_ratio,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": config.norm_eps,
        "image_size": config.img_size,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": True,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": config.ffn_layer != "mlp",
        "use_mask_token": True,
        "torch_dtype": "float32",
    }
    if with_registers:
        cfg["num_register_tokens"] = config.num_register_tokens
    # Not transformers fields (it keeps them as plain attributes): how dinokit resamples the position grid.
    cfg["interpolate_offset"] = config.interpolate_offset
    cfg["interpolate_antialias"] = config.interpolate_antialias
    return cfg
