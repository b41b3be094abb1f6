import itertools
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F

import dinokit
from dinokit.cli import main
from dinokit.errors import DinokitError
from dinokit.models import graph_export
from dinokit.models.graph_export import NormedTokens, export_graph
from dinokit.models.layers.position_interpolation import resample_grid
from tests.conftest import leftover_writer_folders, perturb_scales_and_norms


@pytest.mark.parametrize(("offset", "antialias"), list(itertools.product((0.0, 0.1), (False, True))))
def test_matrix_resampling_equals_f_interpolate(offset, antialias):
    grid = torch.randn(7, 8, 8)
    for h0, w0 in [(9, 8), (8, 11), (3, 5), (16, 4), (1, 1), (23, 17)]:
        if offset:
            sf = ((h0 + offset) / 8, (w0 + offset) / 8)
            ref = F.interpolate(grid[None], scale_factor=sf, mode="bicubic", antialias=antialias)[0]
            scales = 8 / (h0 + offset), 8 / (w0 + offset)
        else:
            ref = F.interpolate(grid[None], size=(h0, w0), mode="bicubic", antialias=antialias)[0]
            scales = 8 / h0, 8 / w0
        out = resample_grid(grid, h0, w0, *scales, antialias=antialias, keep_if_same=False)
        assert out.shape == ref.shape == (7, h0, w0)
        assert (out - ref).abs().max() < 2e-5, (h0, w0)
    same = resample_grid(grid, 8, 8, 8 / 8.1, 8 / 8.1, antialias=antialias, keep_if_same=True)
    assert torch.equal(same, grid)  # the native grid comes back bit for bit, as in eager mode


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg", "dino_vits16", "vit_micro_p4"])
def test_traced_position_embedding_matches_eager(name):
    model = dinokit.create_model(name, depth=1)
    p, m = model.patch_size, model.config.img_size // model.patch_size
    for h0, w0 in [(m, m), (m + 1, m), (m - 2, m + 3), (5, 7)]:
        eager = model.interpolate_pos_encoding(h0 * w0, h0 * p, w0 * p)
        traced = torch.cat([model.pos_embed[:, :1], model.traceable_pos_grid(h0, w0)], dim=1)
        if (h0, w0) == (m, m):
            assert torch.equal(traced, eager)
        else:
            assert (traced - eager).abs().max() < 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb_scales_and_norms(dinokit.create_model("vit_micro_p4", depth=2, num_register_tokens=2)).eval()


def reference(model, x):
    with torch.no_grad():
        return [t.numpy() for t in NormedTokens(model)(x)]


@pytest.fixture(scope="module")
def onnx_export(model, tmp_path_factory) -> tuple[Path, dict]:
    """(path, report) of export_graph(model, "m.onnx", "onnx", image_size=32), exported once (3-4 s) for
    the tests that only read it."""
    path = tmp_path_factory.mktemp("onnx_export") / "m.onnx"
    return path, export_graph(model, path, "onnx", image_size=32)


def test_onnx_has_dynamic_batch_and_size_and_matches_pytorch(model, onnx_export):
    path, report = onnx_export
    assert report["checked_size"] != report["exported_size"] and report["checked_batch"] != 2
    assert max(report["max_abs_diff_cls"], report["max_abs_diff_patch_tokens"]) <= 1e-4
    graph = onnx.load(path).graph
    assert [o.name for o in graph.output] == ["cls", "patch_tokens"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]  # B, 3, H, W
    session = onnxruntime.InferenceSession(str(path))
    for shape in [(1, 3, 32, 32), (4, 3, 16, 40), (2, 3, 48, 8)]:
        x = torch.randn(shape)
        cls, patches = session.run(None, {"images": x.numpy()})
        ref_cls, ref_patches = reference(model, x)
        assert patches.shape == (shape[0], shape[2] * shape[3] // 16, 96)
        assert np.abs(cls - ref_cls).max() <= 1e-4 and np.abs(patches - ref_patches).max() <= 1e-4


def test_torchscript_serves_any_size(model, tmp_path):
    export_graph(model, tmp_path / "m.pt", "torchscript", image_size=24)
    for shape in [(1, 3, 32, 32), (3, 3, 16, 44)]:
        x = torch.randn(shape)
        got = [t.numpy() for t in graph_export.run_torchscript(str(tmp_path / "m.pt"), x)]
        for g, r in zip(got, reference(model, x), strict=True):
            assert np.abs(g - r).max() <= 1e-4


@pytest.mark.parametrize(("fmt", "name"), [("onnx", "m.onnx"), ("torchscript", "m.pt")])
def test_a_graph_export_given_as_weights_is_named_as_a_graph(model, onnx_export, tmp_path, fmt, name):
    """load_model / `dinokit info` on an ONNX export called it a corrupt download; on a TorchScript one
    they passed on torch's weights_only message and warning."""
    if fmt == "onnx":
        path = onnx_export[0]  # export_graph(model, ..., "onnx"), as the TorchScript one below
    else:
        path = tmp_path / name
        export_graph(model, path, fmt, image_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DinokitError, match=f"is {'an ONNX' if fmt == 'onnx' else 'a TorchScript'} graph"):
            dinokit.load_model(path)


def test_failed_check_writes_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setattr(graph_export, "MAX_ABS_DIFF", -1.0)
    with pytest.raises(DinokitError, match="nothing was written"):
        export_graph(model, tmp_path / "m.pt", "torchscript")
    assert list(tmp_path.iterdir()) == []


def test_export_command(model, tmp_path, capsys):
    dinokit.export_model(model, tmp_path / "m.safetensors")
    out = tmp_path / "m.pt"
    assert (
        main(["export", f"model={tmp_path / 'm.safetensors'}", f"out={out}", "format=torchscript", "image_size=16"])
        == 0
    )
    assert "max_abs_diff_patch_tokens" in capsys.readouterr().out and out.is_file()
    onnx = tmp_path / "m.onnx"
    assert main(["export", f"model={tmp_path / 'm.safetensors'}", f"out={onnx}", "format=onnx", "image_size=15"]) == 2
    assert "patch size" in capsys.readouterr().err and not onnx.exists()


def nano(seed: int, **overrides) -> dinokit.VisionTransformer:
    torch.manual_seed(seed)
    return perturb_scales_and_norms(dinokit.create_model("vit_nano_p2", **overrides)).eval()


@pytest.fixture(scope="module")
def traced_programs() -> dict:
    """torch.onnx.export's programs of this module's tests, by the weights and input shape traced."""
    return {}


def trace_each_model_once(patch: pytest.MonkeyPatch, programs: dict) -> None:
    """torch.onnx.export (3-4 s a call: torch.export's tracing) gives again the program it gave for the
    same weights and input shape, which ir.save writes unchanged (it restores the initialisers it moves to
    a .data file): for the tests of how export_graph writes, replaces and checks files, which export
    nano(0) and nano(1) again and again. Every other step of export_graph still runs."""
    trace = torch.onnx.export

    def traced_once(wrapper, args, **kwargs):
        key = (tuple(args[0].shape), *((k, v.numpy().tobytes()) for k, v in wrapper.state_dict().items()))
        if key not in programs:
            programs[key] = trace(wrapper, args, **kwargs)
        return programs[key]

    patch.setattr(torch.onnx, "export", traced_once)


@pytest.fixture
def traced_once(monkeypatch, traced_programs) -> None:
    """torch.onnx.export traces each model of the test once in this module (trace_each_model_once)."""
    trace_each_model_once(monkeypatch, traced_programs)


@pytest.fixture(scope="module")
def large_first_export(tmp_path_factory, traced_programs) -> Path:
    """A folder holding export_graph(nano(0), "model.onnx", "onnx") of a "large" model (weights in a .data
    file): the previous export the tests below start from, exported once (3-4 s) and copied into each."""
    folder = tmp_path_factory.mktemp("large_first_export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graph_export, "LARGE_MODEL_BYTES", 0)
        trace_each_model_once(patch, traced_programs)
        export_graph(nano(0), folder / "model.onnx", "onnx")
    return folder


def previous_export(folder: Path, tmp_path: Path) -> None:
    """The files of `large_first_export` (`folder`) copied into `tmp_path`, as export_graph left them."""
    for p in folder.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())


def test_failed_large_onnx_export_keeps_the_previous_graph_and_its_data(
    tmp_path, monkeypatch, large_first_export, traced_once
):
    """Large models keep their weights in `<name>.data`, which used to be overwritten outside the
    atomic write: a failed export then left the old graph pointing at the new model's weights."""
    monkeypatch.setattr(graph_export, "LARGE_MODEL_BYTES", 0)  # every model "large": weights in a .data file
    first, second = nano(0), nano(1)
    previous_export(large_first_export, tmp_path)  # export_graph(first, tmp_path / "model.onnx", "onnx")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before)[0] == "model.onnx" and onnx_data(tmp_path)
    monkeypatch.setattr(graph_export, "MAX_ABS_DIFF", -1.0)
    with pytest.raises(DinokitError, match="nothing was written"):
        export_graph(second, tmp_path / "model.onnx", "onnx")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary files either
    x = torch.randn(1, 3, 16, 16)
    cls, _ = graph_export.run_onnx(str(tmp_path / "model.onnx"), x)
    assert np.abs(cls.numpy() - reference(first, x)[0]).max() <= 1e-4
    monkeypatch.setattr(graph_export, "MAX_ABS_DIFF", 1e-4)
    export_graph(second, tmp_path / "model.onnx", "onnx")
    cls, _ = graph_export.run_onnx(str(tmp_path / "model.onnx"), x)
    assert np.abs(cls.numpy() - reference(second, x)[0]).max() <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", onnx_data(tmp_path)]


def onnx_data(folder) -> str:
    """The name of the one external data file that folder/model.onnx names."""
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert len(locations) == 1 and (folder / next(iter(locations))).is_file()
    return next(iter(locations))


def test_a_crash_before_the_new_graph_is_moved_in_keeps_the_previous_graph_and_its_data(
    tmp_path, monkeypatch, large_first_export, traced_once
):
    """A large model's graph and data were moved into place one after the other under fixed names: a
    crash between the two renames left the old graph beside the new model's data (its numbers wrong,
    or no session at all). The data now gets a name of its own, and the graph's rename is the switch."""
    monkeypatch.setattr(graph_export, "LARGE_MODEL_BYTES", 0)
    first, second = nano(0), nano(1)
    target = tmp_path / "model.onnx"
    previous_export(large_first_export, tmp_path)  # export_graph(first, target, "onnx")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_replace = os.replace

    def crash_at_the_graph(src, dst):
        if Path(dst) == target:
            raise KeyboardInterrupt  # killed between moving the data and the graph
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_the_graph)
    with pytest.raises(KeyboardInterrupt):
        export_graph(second, target, "onnx")
    monkeypatch.setattr(os, "replace", real_replace)
    assert target.read_bytes() == before["model.onnx"]
    data = onnx_data(tmp_path)
    assert (tmp_path / data).read_bytes() == before[data]  # the old graph's own data, untouched
    x = torch.randn(1, 3, 16, 16)
    assert np.abs(graph_export.run_onnx(str(target), x)[0].numpy() - reference(first, x)[0]).max() <= 1e-4
    export_graph(second, target, "onnx")  # the next export removes the killed one's data file too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", onnx_data(tmp_path)]
    assert np.abs(graph_export.run_onnx(str(target), x)[0].numpy() - reference(second, x)[0]).max() <= 1e-4


def test_a_second_export_to_the_same_path_while_one_runs_is_refused_and_removes_nothing(
    tmp_path, monkeypatch, traced_once
):
    """Two exports at once to one path: the one that finished second removed the other's data file as an
    earlier export's, so the graph moved in last named a data file that was gone (no session at all).
    An export now holds the target while it runs: a second one is refused before it writes anything."""
    monkeypatch.setattr(graph_export, "LARGE_MODEL_BYTES", 0)
    first, second = nano(0), nano(1)
    target = tmp_path / "model.onnx"
    real_replace = os.replace
    second_export = []

    def second_export_meanwhile(src, dst):
        if Path(dst) == target and not second_export:  # the first has moved its data in, not its graph
            second_export.append("started")
            try:
                export_graph(second, target, "onnx")
                second_export.append("finished")
            except DinokitError as e:
                second_export.append(str(e))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_export_meanwhile)
    export_graph(first, target, "onnx")
    monkeypatch.setattr(os, "replace", real_replace)
    assert second_export[1].startswith(f"another process is exporting to {target}"), second_export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", onnx_data(tmp_path)]
    x = torch.randn(1, 3, 16, 16)
    assert np.abs(graph_export.run_onnx(str(target), x)[0].numpy() - reference(first, x)[0]).max() <= 1e-4
    export_graph(second, target, "onnx")  # the target is free again once the first export ended
    assert np.abs(graph_export.run_onnx(str(target), x)[0].numpy() - reference(second, x)[0]).max() <= 1e-4


@pytest.mark.parametrize(("fmt", "name"), [("onnx", "m.onnx"), ("torchscript", "m.pt")])
def test_an_export_removes_the_temporary_folders_of_killed_exports_not_those_of_live_ones(
    tmp_path, fmt, name, traced_once
):
    """A killed export (SIGKILL) left its hidden temporary folder, model-sized, beside the target for
    good; the next export now removes those of dead writers on this host, as io.atomic_folder does."""
    left = leftover_writer_folders(tmp_path, name, name)
    export_graph(nano(0), tmp_path / name, fmt)
    assert not left["dead writer here"].exists()
    assert left["live writer here"].exists() and left["another host's"].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [name, left["live writer here"].name, left["another host's"].name]
    )


def test_export_does_not_change_the_callers_model(tmp_path):
    m = nano(0).train().to(torch.bfloat16)
    params = {k: v.clone() for k, v in m.state_dict().items()}
    dinokit.export_model(m, tmp_path / "m.pt", format="torchscript")
    assert m.training and all(b.training for b in m.blocks)
    assert m.pos_embed.dtype == torch.bfloat16
    assert all(torch.equal(v, params[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_graph_export_uses_the_models_input_channels(tmp_path, fmt):
    gray = nano(0, in_chans=1)
    export_graph(gray, tmp_path / "gray", fmt)
    x = torch.randn(2, 1, 12, 20)
    run = graph_export.run_onnx if fmt == "onnx" else graph_export.run_torchscript
    for g, r in zip(run(str(tmp_path / "gray"), x), reference(gray, x), strict=True):
        assert np.abs(g.numpy() - r).max() <= 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_bad_out_paths_fail_before_the_export_with_the_fix(tmp_path, monkeypatch, capsys, fmt):
    m = nano(0)
    weights = dinokit.export_model(m, tmp_path / "m.safetensors")
    monkeypatch.setattr(graph_export, "save_onnx", lambda *a: pytest.fail("exported before checking out="))
    monkeypatch.setattr(graph_export, "save_torchscript", lambda *a: pytest.fail("exported before checking out="))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DinokitError, match=r"is an existing folder.*Pass a file path"):
        export_graph(m, tmp_path / "folder", fmt)
    with pytest.raises(DinokitError, match=r"m\.safetensors is a file, not a folder"):
        export_graph(m, tmp_path / "m.safetensors" / "graph", fmt)
    assert main(["export", f"model={weights}", f"out={tmp_path / 'folder'}", f"format={fmt}"]) == 2
    assert "existing folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "m.safetensors"]
