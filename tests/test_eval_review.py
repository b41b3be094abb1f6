"""Review findings in evaluation, loading and export: each test failed on the code before its fix."""

import pytest

import dinokit
from dinokit.cli import main


@pytest.fixture(scope="module")
def nano_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "nano.safetensors"
    dinokit.export_model(dinokit.create_model("vit_nano_p2"), path)
    return path


@pytest.mark.parametrize("out", ["copy.safetensors", "copy.pth", "hf_folder"])
def test_export_refuses_image_size_for_a_weights_format(nano_weights, tmp_path, capsys, out):
    """image_size= sets the example size of a graph export only; for weights it was silently ignored."""
    assert main(["export", f"model={nano_weights}", f"out={tmp_path / out}", "image_size=64"]) == 2
    err = capsys.readouterr().err
    assert "image_size" in err and "onnx" in err and "torchscript" in err
    assert not (tmp_path / out).exists()
