"""What a new user meets first: the top-level Python API, `dinokit info`, and mistyped or offline names."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dinokit
from dinokit.models import hub
from dinokit.models.commands import info
from tests.conftest import run_example

ROOT = Path(__file__).resolve().parents[1]


def test_the_images_to_arrays_functions_are_reachable_from_the_top_level():
    """A library user finds preprocessing, feature extraction, the maps and search under `dinokit.`
    (they were only in submodules that the README listed in part)."""
    from dinokit.data.transforms import eval_transform
    from dinokit.features.extract import extract_features
    from dinokit.maps.attention import attention_maps
    from dinokit.retrieval.commands import search_index

    assert dinokit.eval_transform is eval_transform
    assert dinokit.extract_features is extract_features
    assert dinokit.attention_maps is attention_maps
    assert dinokit.search_index is search_index
    for name in dinokit.__all__:
        assert getattr(dinokit, name) is not None and name in dir(dinokit)
    with pytest.raises(AttributeError, match="no attribute 'load_modle'"):
        dinokit.load_modle  # noqa: B018


def test_pil_images_through_the_exported_transform_equal_the_extracted_folder_features(tmp_path):
    """eval_transform + model on a stacked batch of PIL images gives the features that extract_features
    computes from the same images saved as (lossless) PNG files."""
    from PIL import Image

    torch.manual_seed(0)
    model = dinokit.create_model("vit_nano_p2").eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20 + 4 * i, 24, 3), dtype=np.uint8)) for i in range(3)]
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    transform = dinokit.eval_transform(16, patch_size=model.patch_size)
    with torch.inference_mode():
        direct = model(torch.stack([transform(image) for image in images]))
    paths = dinokit.list_images(tmp_path)
    feats, kept, bad = dinokit.extract_features(
        model, paths, transform, precision="fp32", num_workers=0, progress=False
    )
    assert [p.name for p in paths] == ["0.png", "1.png", "2.png"] and kept == [0, 1, 2] and bad == []
    torch.testing.assert_close(feats["cls"], direct, rtol=0, atol=1e-6)


def test_the_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """examples/python_api.py (docs/python.md's walk-through) end to end on a tiny model."""
    weights = dinokit.export_model(dinokit.create_model("vit_micro_p4"), tmp_path / "micro.safetensors")
    example = ["--model", str(weights), "--image-size", "16", "--out", str(tmp_path / "out")]
    run_example(ROOT / "examples" / "python_api.py", example, monkeypatch)
    stdout = capsys.readouterr().out
    assert "cls (2, 96)" in stdout
    assert "last 4 blocks: [((2, 96, 4, 4), (2, 96))" in stdout
    assert "rows: ['astronaut.jpg', 'chelsea.jpg']" in stdout
    assert "search: [('chelsea.jpg', 1.0)" in stdout


def test_info_names_the_architecture_of_each_format(tmp_path):
    """`dinokit info` said format and config but not which architecture the file is (README: 'detected
    format and architecture'); an official .pth, an HF folder and a dinokit file of other shapes."""
    official = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    with torch.device("meta"):
        shapes = dinokit.create_model("dinov2_vits14_reg").state_dict()
    torch.save({k: torch.zeros(v.shape) for k, v in shapes.items()}, official)
    assert info(str(official))["architecture"] == "dinov2_vits14_reg"
    hf = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "hf", format="hf")
    assert info(str(hf))["architecture"] == "vit_nano_p2"
    custom = dinokit.export_model(dinokit.create_model("vit_nano_p2", depth=3), tmp_path / "deeper.safetensors")
    assert info(str(custom))["architecture"] == "custom (nearest: vit_nano_p2)"


def test_a_mistyped_name_or_path_gets_a_suggestion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "my_run").mkdir(parents=True)
    (tmp_path / "runs" / "my_run" / "backbone.safetensors").write_bytes(b"")
    with pytest.raises(dinokit.DinokitError, match=r"Did you mean dinov2_vits14\b"):
        hub.resolve("dinov2_vit14")
    with pytest.raises(dinokit.DinokitError, match=r"Did you mean runs/my_run/backbone\.safetensors"):
        hub.resolve("runs/my_run/backbone.safetensor")
    with pytest.raises(dinokit.DinokitError, match="Did you mean runs/my_run"):
        hub.resolve("runs/my_rn")
    with pytest.raises(dinokit.DinokitError) as far:
        hub.resolve("zzz")
    assert "Did you mean" not in str(far.value)


def test_offline_a_released_name_says_where_a_copied_file_makes_the_name_work(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torch.hub.download_url_to_file", no_network)
    with pytest.raises(dinokit.DinokitError) as offline:
        hub.resolve("dinov2_vits14_reg")
    cached = tmp_path / "cache" / "dinov2_vits14_reg4_pretrain.pth"
    assert f"copy the file to {cached}" in str(offline.value)
    cached.write_bytes(b"x")  # what the message says, done: the name resolves to it
    assert hub.resolve("dinov2_vits14_reg") == cached


def test_a_folder_around_the_weights_names_the_weights_in_it(tmp_path):
    """model=runs (the folder of run folders) or model=weights/ (a download folder) said only 'pass a
    weights file'; it names what load_model reads in it."""
    net = dinokit.create_model("vit_nano_p2")
    dinokit.export_model(net, tmp_path / "runs" / "a" / "backbone.safetensors")
    dinokit.export_model(net, tmp_path / "weights" / "vits.pth")
    (tmp_path / "weights" / "notes.txt").write_text("from the model card")
    with pytest.raises(dinokit.DinokitError, match=r"e\.g\. .*runs/a$"):
        dinokit.load_model(tmp_path / "runs")
    with pytest.raises(dinokit.DinokitError, match=r"e\.g\. .*weights/vits\.pth$"):
        dinokit.load_model(tmp_path / "weights")
    (tmp_path / "empty").mkdir()
    with pytest.raises(dinokit.DinokitError, match=r"run folder\)$"):
        dinokit.load_model(tmp_path / "empty")


def test_save_pretrained_to_a_folder_loads_back_with_from_pretrained(tmp_path):
    """HF users' round trip: save_pretrained(folder) wrote folder/model.safetensors, which
    from_pretrained(folder) refused as a folder without config.json."""
    net = dinokit.create_model("vit_nano_p2", num_register_tokens=2)
    torch.nn.init.normal_(net.cls_token)
    written = net.save_pretrained(str(tmp_path / "mine"))
    assert written == str(tmp_path / "mine" / "model.safetensors")
    back = dinokit.VisionTransformer.from_pretrained(str(tmp_path / "mine"))
    assert back.config == net.config
    x = torch.randn(2, 3, 16, 12)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), net.eval()(x), rtol=0, atol=0)


def test_import_dinokit_leaves_torchvision_for_first_use():
    """`import dinokit` (and so every `dinokit` command, `--help` included) imported torchvision through
    the graph export's size check: 1.2 of its 2.7 s on 2 cores."""
    code = "import sys, dinokit; dinokit.load_model; print('torchvision' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
