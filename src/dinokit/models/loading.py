"""Load a ready model from any weights file or folder users hold, and export to the peers' layouts.

`load_model(source)` needs no architecture argument: the format is detected from the file, the
architecture from keys and shapes (or from the config that dinokit and HF files carry).

Formats read: dinokit safetensors; official backbone `.pth`; official / DINO v1 training checkpoints
(`teacher_checkpoint.pth`, `checkpoint.pth`); Hugging Face folders (`config.json` + `model.safetensors`
or `pytorch_model.bin`, sharded or not, the first in transformers' order); timm state dicts (`.pth`,
`.bin` or `.safetensors`, or a timm Hub folder); a dinokit pretraining run folder (its
`backbone.safetensors`); released names.
"""

import argparse
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dinokit.errors import DinokitError
from dinokit.io import (
    atomic_folder,
    atomic_write,
    atomic_write_large,
    link_entries,
    prepare_output,
    read_json,
    write_json,
)
from dinokit.models.architectures import nearest_architecture
from dinokit.models.formats import hf as hf_format
from dinokit.models.formats import timm as timm_format
from dinokit.models.formats.official import infer_config, unwrap_training_checkpoint
from dinokit.models.graph_export import GRAPH_EXAMPLE_NAMES, GRAPH_FORMATS, export_graph
from dinokit.models.vision_transformer import VisionTransformer, ViTConfig

DINOKIT_CONFIG_KEY = "dinokit_config"
SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; the safetensors format refuses larger headers
EXPORT_FORMATS = ("dinokit", "official", "hf", "onnx", "torchscript")
# out= suffix -> the export formats that write such a file; the first is the one a missing format= means
SUFFIX_FORMATS = {
    ".safetensors": ("dinokit",),
    ".pth": ("official",),
    ".pt": ("official", "torchscript"),
    ".onnx": ("onnx",),
}
FORMAT_NAMES = {
    "dinokit": "a .safetensors file",
    "official": "a .pth file",
    "hf": "a folder",
    "onnx": "an .onnx file",
    "torchscript": "a .pt file",
}


# ------------------------------------------------------------------------------------------ reading
def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a `.safetensors`, `.pth`/`.pt`/`.bin` file, plus safetensors metadata ({} for torch
    files). Never unpickles code (`weights_only=True`, which also allows the plain `argparse.Namespace`
    of DINO v1 training checkpoints); corrupt or truncated files get a clear error."""
    path = Path(path)
    if not path.is_file():
        raise DinokitError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise DinokitError(f"weights file is empty (0 bytes): {path}. Download or export it again.")
    kind = sniff_weights(path)
    if kind == "safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as e:
            raise DinokitError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO v1 checkpoint.pth holds its `args`
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as e:
        raise pickled_objects_error(path, e) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, IndexError... on damaged files
        raise DinokitError(f"{path} could not be read as a PyTorch file (corrupt or truncated?): {e}") from None
    if not isinstance(obj, dict):
        raise DinokitError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return obj, {}


def pickled_objects_error(path: str | Path, error: pickle.UnpicklingError) -> DinokitError:
    """The refusal of a torch file that torch.load(weights_only=True) could not read: it pickles Python
    objects besides tensors (named where torch's `error` names one), which dinokit never unpickles."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    return DinokitError(
        f"{path} holds Python objects besides tensors"
        + (f" ({found[1]})" if found else "")
        + ", and dinokit never unpickles code from a file. "
        "If you trust the file, re-save only its tensors (torch.save(state_dict) or safetensors)."
    )


def sniff_weights(path: Path) -> str:
    """'zip' (torch.save), 'pickle' (legacy torch.save) or 'safetensors', from the file's first bytes;
    a graph (ONNX, TorchScript: `dinokit export` writes both) or anything else (an HTML page saved as
    .pth, an image, ...) is a DinokitError naming the file."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:  # torch.jit.save archives hold constants.pkl, torch.save's none
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "zip"  # damaged: torch.load's error says so
        if not any(Path(name).name == "constants.pkl" for name in names):
            return "zip"
        raise graph_given_as_weights(path, "a TorchScript", "torch.jit.load")
    if head.startswith(b"\x80"):  # pickle protocol 2+ opcode
        return "pickle"
    if head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= SAFETENSORS_MAX_HEADER:
        return "safetensors"  # 8-byte header length, then the JSON header
    if path.suffix.lower() == ".onnx" or head.startswith(b"\x08"):  # ModelProto: ir_version (field 1) first
        raise graph_given_as_weights(path, "an ONNX", "onnxruntime")
    if head.lstrip()[:1] == b"<":
        fix = "It looks like a web page (HTML): download the file itself, not the page linking to it."
    else:
        fix = "Download or export it again."
    raise DinokitError(
        f"{path} is not a PyTorch/safetensors weights file (corrupt or wrong download?): it starts with "
        f"{head[:8]!r}, not a zip, pickle or safetensors header. {fix}"
    )


def graph_given_as_weights(path: Path, graph: str, runner: str) -> DinokitError:
    """The error for an exported graph passed where weights are read."""
    return DinokitError(
        f"{path} is {graph} graph (as `dinokit export` writes), not weights: run it with {runner}. "
        "Give the weights it was exported from instead (a .safetensors / .pth file, a folder or a released name)"
    )


# transformers' order: a folder holding several reads the first (then open_clip's single file).
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Every file name of the HF weights (single, index, shard), e.g. model-00001-of-00002.safetensors.
_HF_WEIGHT_NAME = re.compile(r"(model(-\d+-of-\d+)?\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin)(\.index\.json)?")


def _read_hf_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict | list]:
    config = read_json(folder / "config.json")
    name = next((n for n in (*HF_WEIGHT_FILES, "open_clip_model.safetensors") if (folder / n).exists()), None)
    if name is None:
        raise DinokitError(f"{folder} has a config.json but no model.safetensors or pytorch_model.bin")
    if not name.endswith(".index.json"):
        return read_state_dict(folder / name)[0], config
    weight_map = read_json(folder / name)
    if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
        raise DinokitError(f"{folder / name} has no 'weight_map' object; download or export the folder again")
    sd = {}
    for shard in sorted(set(weight_map["weight_map"].values())):
        sd.update(read_state_dict(folder / shard)[0])
    return sd, config


def read_checkpoint(source: str | Path) -> tuple[dict[str, torch.Tensor], ViTConfig | None, str]:
    """(official-layout state dict, config if the file states it, format name) for a path."""
    path = Path(source)
    if path.is_dir():
        if (path / "backbone.safetensors").exists():  # a dinokit pretraining run folder
            return read_checkpoint(path / "backbone.safetensors")
        if (path / "model.safetensors").is_file() and not (path / "config.json").exists():
            return read_checkpoint(path / "model.safetensors")  # VisionTransformer.save_pretrained(folder)
        checkpoints = sorted((path / "checkpoints").glob("checkpoint_*.pt"))  # zero-padded iterations
        if checkpoints and not (path / "config.json").exists():  # a run going on, or stopped before its end
            raise DinokitError(
                f"{path} is a pretraining run with no backbone.safetensors yet (written when the run ends): "
                f"pass its newest checkpoint, {checkpoints[-1]} (its teacher is read), or resume the run to its end"
            )
        if not (path / "config.json").exists():
            raise DinokitError(
                f"{path} is a folder without config.json or backbone.safetensors; pass a weights file "
                f"(or a Hugging Face / run folder){weights_inside(path)}"
            )
        sd, config = _read_hf_folder(path)
        if isinstance(config, dict) and "model_type" not in config and "architecture" in config:  # timm Hub folder
            return timm_format.timm_to_official(sd), None, "timm"
        return hf_format.hf_to_official(sd), hf_format.config_from_hf(config, str(path / "config.json")), "hf"
    sd, metadata = read_state_dict(path)
    if DINOKIT_CONFIG_KEY in metadata:
        return sd, stored_config(metadata[DINOKIT_CONFIG_KEY], path), "dinokit"
    sd = unwrap_training_checkpoint(sd)  # a no-op for a bare backbone state dict
    if hf_format.is_hf(sd):
        return hf_format.hf_to_official(sd), _hf_config_beside(path), "hf"
    if timm_format.is_timm(sd):
        return timm_format.timm_to_official(sd), None, "timm"
    return sd, None, "official"


def weights_inside(folder: Path, shown: int = 3) -> str:
    """', e.g. A or B' naming what in `folder` (one level down) load_model reads: weights files, run
    folders, HF folders; '' if nothing. What a user meant who passed the folder around them."""
    weights = (".pth", ".pt", ".bin", ".safetensors")
    found = sorted(
        entry
        for entry in folder.iterdir()
        if (entry.is_file() and entry.suffix in weights)
        or (entry.is_dir() and any((entry / name).is_file() for name in ("backbone.safetensors", "config.json")))
    )
    return f", e.g. {' or '.join(str(p) for p in found[:shown])}" if found else ""


def stored_config(text: str, path: Path) -> ViTConfig:
    """The ViTConfig a dinokit file states in its metadata; a damaged one, or one naming options this
    version lacks (a newer dinokit's export), is a DinokitError naming the file."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError:
        fields = None
    if not isinstance(fields, dict):
        raise DinokitError(f"{path}: its dinokit_config metadata is not a JSON object (damaged?); export it again")
    unknown = sorted(set(fields) - set(ViTConfig.__dataclass_fields__))
    if unknown:
        raise DinokitError(
            f"{path} states architecture options this dinokit does not know: {unknown} (written by a newer "
            "dinokit?): upgrade dinokit, or export the model there in the official or hf format"
        )
    return ViTConfig(**fields)


def _hf_config_beside(path: Path) -> ViTConfig | None:
    """The architecture in the transformers `config.json` beside an HF weights file, or None where there
    is none: no such file, or one without a `model_type` (e.g. a training run's own config), in which
    case the architecture is inferred from the weights."""
    config_file = path.parent / "config.json"
    if not config_file.exists():
        return None
    cfg = read_json(config_file)
    if isinstance(cfg, dict) and "model_type" not in cfg:
        return None
    return hf_format.config_from_hf(cfg, str(config_file))


# ------------------------------------------------------------------------------------------ loading
def load_model(source: str | Path, device: str | torch.device = "cpu", **overrides) -> VisionTransformer:
    """A ready model (eval mode) from a weights file, folder or released name.

    source: a path (any format above) or a released name (`dinov2_vits14`, `dinov2_vitb14_reg`,
      `dino_vits16`, `facebook/dinov2-small`, ...), downloaded once and cached.
    overrides: architecture options that the weights cannot tell, e.g. `num_heads` for a custom
      official-layout file, or `interpolate_offset=0.0` to reproduce transformers' `Dinov2Model`.
      Files without a config take heads and interpolation from the named architecture of the same
      shape; without one they are guessed with a warning that names these overrides.
    """
    from dinokit.models.hub import resolve

    path = resolve(source)
    sd, config, fmt = read_checkpoint(path)
    if config is None:
        guessed = ("num_heads", "interpolate_offset", "interpolate_antialias")
        config = infer_config(sd, **{k: overrides[k] for k in guessed if k in overrides})
    unknown = set(overrides) - set(ViTConfig.__dataclass_fields__)
    if unknown:
        raise DinokitError(
            f"unknown architecture options {sorted(unknown)}; valid: {sorted(ViTConfig.__dataclass_fields__)}"
        )
    config = ViTConfig(**{**config.to_dict(), **overrides})
    with torch.device("meta"):
        model = VisionTransformer(config)
    expected = model.state_dict()
    if config.mask_token and "mask_token" not in sd:
        sd = {**sd, "mask_token": torch.zeros(1, config.embed_dim)}  # the official init of an absent token
    check_keys(sd, expected, config, f"{path} ({fmt} format)")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=torch.float32).eval()


def check_keys(sd: dict, expected: dict, config: ViTConfig, what: str) -> None:
    """Raise a DinokitError listing missing, unexpected and mis-shaped keys, naming the nearest known
    architecture, if `sd` does not fit a model whose state dict is `expected`."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(sd) & set(expected))
        if sd[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return

    def show(items: list[str]) -> str:
        return ", ".join(items[:12]) + (f" ... (+{len(items) - 12} more)" if len(items) > 12 else "")

    lines = [
        f"{what} does not match the architecture it describes "
        f"(nearest known architecture: {nearest_architecture(config)}; inferred {config})."
    ]
    if missing:
        lines.append(f"Missing keys ({len(missing)}): {show(missing)}")
    if unexpected:
        lines.append(f"Unexpected keys ({len(unexpected)}): {show(unexpected)}")
    if shapes:
        lines.append(f"Shape mismatches ({len(shapes)}): {show(shapes)}")
    lines.append("Pass architecture options to load_model(...) if the file's architecture was not detected right.")
    raise DinokitError("\n".join(lines))


# ------------------------------------------------------------------------------------------ export
def export_format(path: str | Path, format: str | None = None) -> str:
    """The export format for `path`: `format`, checked against the suffix, or where it is None the one
    the suffix names (.safetensors: dinokit, .pth / .pt: official, .onnx: onnx; a folder or a name
    without suffix: hf). An unknown suffix without format=, or a contradicting one, is a DinokitError."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if format is None:
        if suffix in SUFFIX_FORMATS:
            return SUFFIX_FORMATS[suffix][0]
        if not suffix or path.is_dir():
            return "hf"
        raise DinokitError(
            f"cannot tell the export format from {path} (unknown suffix {suffix}): name it .safetensors "
            f"(dinokit), .pth (official) or .onnx, use a folder (hf), or pass format=, one of "
            f"{', '.join(EXPORT_FORMATS)}"
        )
    if format not in EXPORT_FORMATS:
        raise DinokitError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if format == "dinokit" and suffix not in ("", ".safetensors") and not path.is_dir():
        raise DinokitError(
            f"format=dinokit writes a .safetensors file, but {path} ends in {suffix}: "
            f"name it {path.with_suffix('.safetensors').name}"
        )
    if suffix in SUFFIX_FORMATS and format not in SUFFIX_FORMATS[suffix]:
        named = SUFFIX_FORMATS[suffix][0]
        raise DinokitError(
            f"format={format} writes {FORMAT_NAMES[format]}, but {path} is named as {FORMAT_NAMES[named]} "
            f"(format={named}): drop format= to write {named}, or give {FORMAT_NAMES[format]} for {format}"
        )
    return format


def export_model(
    model: VisionTransformer, path: str | Path, format: str | None = None, image_size: int | None = None
) -> str:
    """Write `model` as dinokit safetensors (weights + architecture), the official `.pth` layout, a
    Hugging Face folder (`config.json` + `model.safetensors`) that `transformers.Dinov2Model` /
    `Dinov2WithRegistersModel.from_pretrained` loads, or an ONNX / TorchScript graph (any batch and
    size; `image_size` is the example size, default the native one; see `graph_export`). Writes are
    atomic (one killed mid-write leaves a temporary folder that the next export removes); `path` is checked
    before any work (`output_path`). Returns the written path.

    format: by default the one `path` is named as (`export_format`: .safetensors dinokit, .pth / .pt
    official, .onnx onnx, a folder hf); a format that contradicts the suffix is an error.

    hf: the class is the one that resamples the position grid as the model (`hf.with_registers_class`:
    register models and offset 0 + antialias models are `Dinov2WithRegistersModel`); where none does
    (offset 0.1: DINO, DINOv2) a warning says so. An existing folder is replaced whole, its weight
    files (index, shards, pytorch_model.bin) dropped and its other files kept; a failed or interrupted
    export leaves it as it was."""
    format = export_format(path, format)
    check_image_size_applies(format, image_size)
    if format in GRAPH_FORMATS:
        return export_graph(model, path, format, image_size)["path"]
    path = output_path(path, format)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    if format == "dinokit":
        atomic_write_large(
            path, lambda tmp: save_file(sd, tmp, metadata={DINOKIT_CONFIG_KEY: json.dumps(model.config.to_dict())})
        )
    elif format == "official":
        sd = with_official_mask_token(sd, model.config)
        warn_if_read_back_otherwise(sd, model.config, path)
        atomic_write_large(path, lambda tmp: torch.save(sd, tmp))
    else:
        _write_hf_folder(sd, model.config, path)
    return str(path)


def check_image_size_applies(format: str, image_size: int | None) -> None:
    """image_size is the example size of a graph export; weights formats have none (a DinokitError
    rather than a key accepted and ignored)."""
    if image_size is not None and format not in GRAPH_FORMATS:
        raise DinokitError(
            f"image_size={image_size} sets the example size of a graph export (onnx, torchscript); "
            f"format={format} writes weights, which serve every size: leave image_size out"
        )


def with_official_mask_token(sd: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """`sd` with the zero mask token (the official init) of a DINOv2 model (LayerScale or registers) that
    has none (transformers' use_mask_token=False, mask_token=False; timm files get theirs when read): the
    official model always has one and loads strictly. DINO v1 (neither) has no mask token."""
    if "mask_token" in sd or (config.init_values is None and not config.num_register_tokens):
        return sd
    return {**sd, "mask_token": torch.zeros(1, config.embed_dim)}


# not in official weights (the LayerNorm eps: read back as the official 1e-6)
UNSTORED_OPTIONS = ("num_heads", "interpolate_offset", "interpolate_antialias", "norm_eps")


def warn_if_read_back_otherwise(sd: dict, config: ViTConfig, path: Path) -> None:
    """The official layout holds weights only: warn where `load_model` would read the file back with
    other heads or interpolation than the model's (a shape no named architecture has), or another
    LayerNorm eps (e.g. transformers' ViTModel default 1e-12)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # infer_config's own guess warning is for the reader
        back = infer_config(sd)
    lost = {k: getattr(config, k) for k in UNSTORED_OPTIONS if getattr(back, k) != getattr(config, k)}
    if lost:
        warnings.warn(
            f"{path}: the official .pth layout does not store {', '.join(lost)}, and load_model would read "
            f"this model back with {', '.join(f'{k}={getattr(back, k)!r}' for k in lost)}: read it with "
            f"load_model(path, {', '.join(f'{k}={v!r}' for k, v in lost.items())}), or export it as "
            ".safetensors (dinokit format), which stores them",
            stacklevel=3,
        )


def output_path(path: str | Path, format: str, create: bool = True) -> Path:
    """The file (folder for `hf`) that export_model(format=...) writes for `path` (dinokit: a
    `.safetensors` name), checked up front: an existing folder given for a file, an existing file
    given for a folder, or an unwritable place raises a DinokitError that says what to pass instead."""
    path = Path(path).expanduser()
    if format == "dinokit" and path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors") if path.suffix else path / "model.safetensors"
    examples = {"dinokit": "model.safetensors", "official": "model.pth", **GRAPH_EXAMPLE_NAMES}
    if format == "hf":  # written beside `path`, then renamed into place: its parent is created, not it
        prepare_output(path.parent, folder=True, create=create)
        return prepare_output(path, folder=True, create=False)
    return prepare_output(path, example=examples.get(format, ""), create=create)


def _write_hf_folder(sd: dict[str, torch.Tensor], config: ViTConfig, folder: Path) -> None:
    """config.json + model.safetensors in a new folder that replaces `folder` whole (io.atomic_folder),
    so that a reader never sees a file of this export beside one of an earlier one, and a failed or
    interrupted export leaves the earlier folder as it was. The earlier folder's other files (a
    README, ...) are carried over; its weight files (index and shards, pytorch_model.bin) are not, so
    that no reader picks stale weights."""
    mismatch = hf_format.interpolation_mismatch(config)
    if mismatch:
        warnings.warn(mismatch, stacklevel=3)
    hf_sd = hf_format.official_to_hf(sd, config)
    with atomic_folder(folder, replace=True) as tmp:
        link_entries(folder, tmp, keep=lambda name: name != "config.json" and not _HF_WEIGHT_NAME.fullmatch(name))
        atomic_write(tmp / "model.safetensors", lambda t: save_file(hf_sd, t, metadata={"format": "pt"}))
        write_json(tmp / "config.json", hf_format.hf_config(config))
