"""Model commands: the architecture table, what a weights file holds, and format conversion."""

import torch

from dinokit.io import refuse_output_over_inputs
from dinokit.models.architectures import ARCHITECTURES, architecture_name, count_parameters, create_model
from dinokit.models.graph_export import GRAPH_FORMATS, export_graph
from dinokit.models.loading import (
    check_image_size_applies,
    export_format,
    export_model,
    load_model,
    output_path,
    read_checkpoint,
)


def architecture_table() -> list[dict]:
    """One row per named architecture, parameters counted at its native position grid."""
    rows = []
    for name, cfg in ARCHITECTURES.items():
        with torch.device("meta"):
            params = count_parameters(create_model(name))
        rows.append(
            {
                "name": name,
                "params": params,
                "dim": cfg.embed_dim,
                "depth": cfg.depth,
                "heads": cfg.num_heads,
                "patch": cfg.patch_size,
                "img_size": cfg.img_size,
                "registers": cfg.num_register_tokens,
                "ffn": cfg.ffn_layer,
                "layerscale": cfg.init_values is not None,
            }
        )
    return rows


def list_models() -> None:
    """List the named architectures with their parameter counts."""
    header = f"{'name':<20} {'params':>14} {'dim':>5} {'depth':>5} {'heads':>5} {'patch':>5} {'img':>4} {'reg':>3}  ffn"
    print(header)
    print("-" * len(header))
    for r in architecture_table():
        print(
            f"{r['name']:<20} {r['params']:>14,} {r['dim']:>5} {r['depth']:>5} {r['heads']:>5} "
            f"{r['patch']:>5} {r['img_size']:>4} {r['registers']:>3}  {r['ffn']}"
        )


def info(model: str) -> dict:
    """Detect the format and architecture of a weights file, folder or released name.

    Returns source (the file or folder read), format, architecture (the named one whose network it
    is, `dinokit models`, else 'custom (nearest: NAME)'), parameters and the full config."""
    from dinokit.models.hub import resolve

    path = resolve(model)
    _, _, fmt = read_checkpoint(path)
    m = load_model(path)
    return {
        "source": str(path),
        "format": fmt,
        "architecture": architecture_name(m.config),
        "parameters": count_parameters(m),
        "config": m.config.to_dict(),
    }


def export(model: str, out: str, format: str | None = None, image_size: int | None = None) -> str | dict:
    """Convert weights: dinokit (safetensors), official (.pth), hf (folder), onnx or torchscript.

    model: any file, folder or name that load_model reads. out: the file (dinokit, official, onnx,
    torchscript) or folder (hf) to write. format: by default the one out is named as (.safetensors:
    dinokit, .pth / .pt: official, .onnx: onnx, a folder: hf); torchscript is format=torchscript. A
    format that contradicts out's suffix is an error. onnx / torchscript: a graph from images (any
    batch, any size that is a multiple of the patch size) to the normed CLS and patch tokens,
    exported at image_size (default: the model's native size) and checked against PyTorch at another
    size; the report (max abs differences) is printed.
    """
    format = export_format(out, format)
    check_image_size_applies(format, image_size)
    # a bad out= fails before the model is read; one that is (or holds) model= would replace a checkpoint
    refuse_output_over_inputs(output_path(out, format, create=False), "the export", model=model)
    net = load_model(model)
    if format in GRAPH_FORMATS:
        return export_graph(net, out, format, image_size)
    return export_model(net, out, format=format)
