"""ONNX and TorchScript export: one graph for every batch size and every image size.

The graph maps images (B, C, H, W), C = `config.in_chans`, H and W multiples of the patch size, to the normed CLS token
(B, D) and the normed patch tokens (B, H/p * W/p, D), the `x_norm_clstoken` / `x_norm_patchtokens` of
`forward_features`. The position grid is resampled inside the graph (see
`layers/position_interpolation.py`), so sizes other than the example one give the eager model's
numbers. Every export is written into a temporary folder beside the target (`io.writers_folder`,
which also removes those of killed exports) and checked there before it is moved into place: the
file is run (onnxruntime, or the TorchScript loader) on a batch and size other than the exported
ones and compared with PyTorch. A large model's ONNX weights go to a file
`<name>.onnx.<random>.data` named by the graph, a name no earlier export used: it is moved in first,
then the graph is renamed over the old one, which switches from the old pair to the new one at once;
the earlier data files are removed last. A failed or interrupted export leaves the previous graph
and its data untouched. One export of a path runs at a time: a second one is refused (it would
remove the running one's data file as an earlier export's). The caller's model is not changed (a
float32 CPU copy is exported).
"""

import copy
import glob
import os
import re
import secrets
import warnings
from pathlib import Path

import torch
from torch import nn

from dinokit.errors import DinokitError
from dinokit.io import file_lock, prepare_output, sync, writers_folder
from dinokit.models.vision_transformer import VisionTransformer

GRAPH_FORMATS = ("onnx", "torchscript")
GRAPH_EXAMPLE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}  # suggested where out= is a folder
ONNX_OPSET = 18
MAX_ABS_DIFF = 1e-4  # fp32 tolerance of the check
LARGE_MODEL_BYTES = 1_800_000_000  # above this the ONNX weights go to a `.data` file (protobuf's 2 GB limit)


class NormedTokens(nn.Module):
    """images (B, C, H, W) -> (cls (B, D), patch_tokens (B, N, D)), both after the final LayerNorm."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.forward_features(images)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def example_inputs(model: VisionTransformer, image_size: int | None, batch: int = 2) -> torch.Tensor:
    """A (batch, C, S, S) input, C = config.in_chans, S = image_size (default: the model's native size)."""
    size = image_size or model.config.img_size
    from dinokit.data.transforms import check_image_size  # here: torchvision is 1.2 s of `import dinokit`

    check_image_size(size, model.patch_size)
    return torch.randn(batch, model.config.in_chans, size, size, generator=torch.Generator().manual_seed(0))


def check_inputs(model: VisionTransformer, exported: torch.Tensor) -> torch.Tensor:
    """A batch of 3 at a non-square size other than the exported one (one and two patches larger)."""
    p = model.patch_size
    h, w = exported.shape[-2] + p, exported.shape[-1] + 2 * p
    return torch.randn(3, exported.shape[1], h, w, generator=torch.Generator().manual_seed(1))


def export_graph(model: VisionTransformer, path: str | Path, format: str, image_size: int | None = None) -> dict:
    """Export to ONNX (`format='onnx'`) or TorchScript (`'torchscript'`), checked against PyTorch.

    Returns {path, format, exported_size, checked_size, checked_batch, max_abs_diff_cls,
    max_abs_diff_patch_tokens}. Raises DinokitError (and writes nothing) if the check exceeds 1e-4, or
    if another export of `path` is running (io.file_lock).
    """
    if format not in GRAPH_FORMATS:
        raise DinokitError(f"unknown graph format {format!r}; choose one of {', '.join(GRAPH_FORMATS)}")
    path = prepare_output(path, example=GRAPH_EXAMPLE_NAMES[format])
    # one export of `path` at a time: each removes the data files of earlier exports when it ends,
    # and would remove those of one still running (whose graph, moved in last, then names no data)
    with file_lock(path, "exporting to", wait=False):
        return write_graph(model, path, format, image_size)


def write_graph(model: VisionTransformer, path: Path, format: str, image_size: int | None) -> dict:
    """export_graph's work, while it holds `path`."""
    net = copy.deepcopy(model).to("cpu", torch.float32).eval()  # the caller's model keeps its device, dtype, mode
    wrapper = NormedTokens(net).eval()
    example = example_inputs(net, image_size)
    check = check_inputs(net, example)
    with torch.no_grad():
        expected = wrapper(check)
    with writers_folder(path) as tmp:  # those of killed exports are removed first
        written = tmp / path.name
        if format == "onnx":
            save_onnx(wrapper, example, str(written), external_data_name=f"{path.name}.{secrets.token_hex(4)}.data")
            got = run_onnx(str(written), check)
        else:
            save_torchscript(wrapper, example, str(written))
            got = run_torchscript(str(written), check)
        diffs = [float((g - e).abs().max()) for g, e in zip(got, expected, strict=True)]
        if max(diffs) > MAX_ABS_DIFF:
            raise DinokitError(
                f"the exported {format} graph differs from PyTorch by {max(diffs):.2e} (> {MAX_ABS_DIFF}) at "
                f"{tuple(check.shape)}; nothing was written. Please report this with the model you exported."
            )
        move_into_place(tmp, path, format)
    return {
        "path": str(path),
        "format": format,
        "exported_size": list(example.shape[-2:]),
        "checked_size": list(check.shape[-2:]),
        "checked_batch": check.shape[0],
        "max_abs_diff_cls": diffs[0],
        "max_abs_diff_patch_tokens": diffs[1],
    }


def move_into_place(folder: Path, path: Path, format: str) -> None:
    """Move `folder`/<name> to `path`, after the other files of `folder` (ONNX external data, named
    apart from every earlier export's): the graph's rename is the one step that replaces the old
    export, so no crash leaves a graph beside another export's data. Then the ONNX data files of
    earlier exports (`<name>.data`, `<name>.<8 hex digits>.data`, those of killed exports too) are
    removed."""
    moved = [file.name for file in folder.iterdir() if file.name != path.name]
    for name in moved:
        sync(folder / name)
        os.replace(folder / name, path.with_name(name))
    sync(folder / path.name)
    sync(path.parent)
    os.replace(folder / path.name, path)
    sync(path.parent)
    if format == "onnx":
        earlier = re.compile(re.escape(path.name) + r"(\.[0-9a-f]{8})?\.data")
        for data in path.parent.glob(f"{glob.escape(path.name)}*.data"):
            if earlier.fullmatch(data.name) and data.name not in moved:
                data.unlink(missing_ok=True)


def save_onnx(wrapper: NormedTokens, example: torch.Tensor, path: str, external_data_name: str) -> None:
    """torch.export-based ONNX export with dynamic batch, height and width (multiples of the patch)."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
        from onnxscript import ir
    except ImportError:
        raise DinokitError("ONNX export needs onnx and onnxscript: pip install 'dinokit[export]'") from None
    from torch.export import Dim

    p = wrapper.model.patch_size
    dynamic = {"images": {0: Dim("batch"), 2: p * Dim("patch_rows"), 3: p * Dim("patch_cols")}}
    with warnings.catch_warnings(), torch.no_grad():  # an inference graph: the blocks' plain ops
        warnings.simplefilter("ignore")  # the exporter's chatter; the result is checked numerically instead
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["cls", "patch_tokens"],
            dynamic_shapes=dynamic,
            opset_version=ONNX_OPSET,
            verbose=False,
        )
    large = sum(t.numel() * t.element_size() for t in wrapper.parameters()) > LARGE_MODEL_BYTES
    ir.save(program.model, path, external_data=external_data_name if large else None)


def run_onnx(path: str, images: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of an exported ONNX file for `images`, through onnxruntime on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise DinokitError("checking an ONNX export needs onnxruntime: pip install 'dinokit[export]'") from None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()})]


def save_torchscript(wrapper: NormedTokens, example: torch.Tensor, path: str) -> None:
    """torch.jit.trace; sizes are read from the input at run time, so any batch and size work."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape checks and the deprecation notice
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        torch.jit.save(traced, path)


def run_torchscript(path: str, images: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of a saved TorchScript file for `images`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(path, map_location="cpu")
    with torch.no_grad():
        return list(module(images))
