"""Dense probes on rendered scenes with exact masks and depth (dinokit.data.synthetic).

"Strong enough" backbone: no pretrained weights can be downloaded here, so the tests use a small ViT
trained with supervision on other rendered scenes (tests/fixtures/make_dense_backbone.py), i.e. a
backbone whose patch tokens are known to carry the masks and depths. The probes, trained from
scratch on its frozen features, must recover that signal and beat the trivial baselines by a wide
margin; the same architecture at random initialisation must not (so the margin comes from the
features, and the test can fail). Honestly: this 0.5M-parameter backbone carries foreground vs
background and depth strongly, but which of the 8 shapes a pixel belongs to only weakly (a linear
probe on it reaches about 20% mIoU against 9% for "all background"; per-shape IoUs 3-30%).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.cli import main
from dinokit.data.synthetic import write_dense_set
from dinokit.errors import DinokitError
from dinokit.eval.dense import load_head_file, read_depth, read_mask, read_pairs

FIXTURE = Path(__file__).parent / "fixtures" / "dense_backbone.safetensors"


@pytest.fixture(autouse=True)
def one_thread():
    """These probes are small: on a busy machine one thread is up to 5x faster than a thrashing pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


COMMON = ["image_size=64", "num_workers=0", "batch_size=64", "train_batch_size=16"]


def scene_folders(factory, name: str, train: int, val: int, size: int):
    """root/train and root/val of rendered dense scenes (masks and depth)."""
    root = factory.mktemp(name)
    write_dense_set(root / "train", train, size=size, seed=0)
    write_dense_set(root / "val", val, size=size, seed=1)
    return root


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return scene_folders(tmp_path_factory, "scenes", 64, 24, size=64)


@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory):
    """The fixture's architecture at random initialisation (the control)."""
    torch.manual_seed(0)
    config = dinokit.load_model(FIXTURE).config
    path = tmp_path_factory.mktemp("random") / "random.safetensors"
    return dinokit.export_model(dinokit.VisionTransformer(config), path)


def run(command: str, model, scenes, out: Path, *extra: str) -> dict:
    args = [f"model={model}", f"train={scenes / 'train'}", f"val={scenes / 'val'}", f"out={out}", *COMMON, *extra]
    assert main(["eval", command, *args, f"cache={out.parent / 'cache'}"]) == 0
    return json.loads((out / f"{command}.json").read_text())


def test_segmentation_probe_beats_trivial_baselines_on_a_backbone_that_carries_the_signal(
    scenes, random_backbone, tmp_path
):
    r = run("segmentation", FIXTURE, scenes, tmp_path / "seg", "epochs=25", "lr=3e-3")
    majority = r["baselines"]["majority_class"]
    best_baseline = max(b["miou"] for b in r["baselines"].values())
    assert majority["miou"] < 10.0  # all background: background IoU / 9 classes
    assert r["miou"] >= 1.6 * best_baseline
    # where the signal is strongest, foreground vs background: background IoU well above "all background"
    assert r["iou_per_class"][0] >= majority["iou"][0] + 5
    assert len(r["iou_per_class"]) == 9 and r["protocol"]["blocks"] == [3]
    control = run("segmentation", random_backbone, scenes, tmp_path / "control", "epochs=25", "lr=3e-3")
    assert control["miou"] < 1.2 * best_baseline < r["miou"]
    assert control["iou_per_class"][0] < majority["iou"][0] + 2
    for png in r["examples"]:
        assert Image.open(png).size == (3 * 64 + 2 * 4, 64)  # image | truth | prediction

    # the saved head applied to new images by `dinokit predict segmentation`
    out = tmp_path / "predicted"
    head = tmp_path / "seg" / "segmentation_head.safetensors"
    assert main(["predict", "segmentation", f"head={head}", f"images={scenes / 'val' / 'images'}", f"out={out}"]) == 0
    truth = [read_mask(p) for p in sorted((scenes / "val" / "masks").iterdir())]
    predicted = [read_mask(out / p.name) for p in sorted((scenes / "val" / "masks").iterdir())]
    assert predicted[0].shape == truth[0].shape and (out / "00000_overlay.png").exists()
    # the same head on features recomputed from the files reproduces the evaluation
    accuracy = 100 * np.mean(np.concatenate([(p == t).ravel() for p, t in zip(predicted, truth, strict=True)]))
    assert abs(accuracy - r["pixel_accuracy"]) < 1.0


def test_depth_probe_beats_trivial_baselines_on_a_backbone_that_carries_the_signal(scenes, random_backbone, tmp_path):
    r = run("depth", FIXTURE, scenes, tmp_path / "depth", "epochs=8", "max_depth=15")
    per_pixel = r["baselines"]["per_pixel_mean"]  # the stronger baseline: the background depth is set by the row
    assert r["rmse"] <= 0.7 * per_pixel["rmse"] and r["abs_rel"] <= 0.5 * per_pixel["abs_rel"]
    assert r["delta1"] >= per_pixel["delta1"] + 15
    assert r["protocol"]["bins"] == "linspace(0.001, 15.0, 256)" and r["protocol"]["blocks"] == [0, 1, 2, 3]
    control = run("depth", random_backbone, scenes, tmp_path / "control", "epochs=8", "max_depth=15")
    assert control["rmse"] > 0.9 * per_pixel["rmse"]

    out = tmp_path / "predicted"
    head = tmp_path / "depth" / "depth_head.safetensors"
    assert (
        main(["predict", "depth", f"head={head}", f"images={scenes / 'val' / 'images' / '00001.png'}", f"out={out}"])
        == 0
    )
    predicted = read_depth(out / "00001.png", 1000.0)
    truth = read_depth(scenes / "val" / "depth" / "00001.png", 1000.0)
    assert predicted.shape == truth.shape and predicted.min() >= 0.001 and predicted.max() <= 15.0
    assert np.sqrt(np.mean((predicted - truth) ** 2)) < per_pixel["rmse"]


def test_dense_data_errors_and_formats(tmp_path, capsys):
    train = write_dense_set(tmp_path / "train", 3, size=16, seed=0)
    val = write_dense_set(tmp_path / "val", 1, size=16, seed=1)
    Image.fromarray(np.full((16, 16), 12, dtype=np.uint8)).save(val / "masks" / "00000.png")
    args = [f"train={train}", f"val={val}", "model=random:vit_nano_p2", "image_size=16", "epochs=1", "cache=none"]
    assert main(["eval", "segmentation", *args, f"out={tmp_path / 'o'}", "num_workers=0", "num_classes=9"]) == 2
    assert "holds class 12 but num_classes=9" in capsys.readouterr().err
    root = write_dense_set(tmp_path / "set", 2, size=16, seed=0)
    (root / "masks" / "00001.png").unlink()
    with pytest.raises(DinokitError, match=r"1 image\(s\) .* have no masks file .* 00001.png needs masks/00001.png"):
        read_pairs(root, "masks", (".png",))
    with pytest.raises(DinokitError, match="must hold images/ and depth/"):
        read_pairs(tmp_path, "depth", (".png", ".npy"))
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(DinokitError, match="one class index per pixel"):
        read_mask(tmp_path / "rgb.png")
    metres = np.array([[1.5, 0.0], [12.25, np.nan]], dtype=np.float32)
    np.save(tmp_path / "d.npy", metres)
    assert np.array_equal(read_depth(tmp_path / "d.npy", 1000.0), np.nan_to_num(metres))
    Image.fromarray(np.array([[1500, 0], [12250, 7]], dtype=np.uint16)).save(tmp_path / "d.png")
    assert np.allclose(read_depth(tmp_path / "d.png", 1000.0), [[1.5, 0.0], [12.25, 0.007]])


def test_predict_writes_full_size_outputs_and_checks_the_backbone(tmp_path, capsys):
    from dinokit.eval.common import prepare_backbone
    from dinokit.eval.dense import head_metadata, save_head
    from dinokit.eval.segmentation import LinearSegmentationHead

    backbone = prepare_backbone("random:vit_nano_p2", "cpu", seed=0)
    head = LinearSegmentationHead(backbone.model.embed_dim, 3).eval()
    meta = head_metadata(backbone, 16, (1,), True, 0, task="segmentation", num_classes=3, ignore_index=255)
    save_head(tmp_path / "head.safetensors", head, meta)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "in" / "wide.png")  # W=30, H=20
    (tmp_path / "in" / "broken.jpg").write_bytes(b"nope")
    args = ["predict", "segmentation", f"head={tmp_path / 'head.safetensors'}", f"images={tmp_path / 'in'}"]
    assert main([*args, f"out={tmp_path / 'out'}", "num_workers=0"]) == 0
    mask = read_mask(tmp_path / "out" / "wide.png")
    assert mask.shape == (20, 30) and mask.max() < 3 and "skipped 1 unreadable" in capsys.readouterr().out
    assert main([*args, f"out={tmp_path / 'o2'}", "model=random:vit_nano_p2", "num_workers=0"]) == 0  # same seed
    assert main([*args[:1], "depth", *args[2:], f"out={tmp_path / 'o3'}"]) == 2
    assert "is a segmentation head, not a depth head" in capsys.readouterr().err
    other = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "other.safetensors")
    assert main([*args, f"out={tmp_path / 'o4'}", f"model={other}"]) == 2
    assert "Pass the backbone the head was trained with" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_scenes(tmp_path_factory):
    """A handful of 32 px scenes: enough for the probes to run end to end in a second or two."""
    return scene_folders(tmp_path_factory, "small", 6, 3, size=32)


SMALL = ["image_size=32", "epochs=1", "cache=none", "num_workers=0", "batch_size=8", "train_batch_size=4"]


def small_run(command: str, scenes: Path, out: Path, *extra: str) -> dict:
    args = [f"model={FIXTURE}", f"train={scenes / 'train'}", f"val={scenes / 'val'}", f"out={out}", *SMALL, *extra]
    assert main(["eval", command, *args]) == 0
    return json.loads((out / f"{command}.json").read_text())


def test_segmentation_on_the_last_4_blocks_concatenated(small_scenes, tmp_path, capsys):
    r = small_run("segmentation", small_scenes, tmp_path / "seg", "n_last_blocks=4")
    assert r["protocol"]["blocks"] == [0, 1, 2, 3] and 0.0 <= r["miou"] <= 100.0
    head = load_head_file(str(tmp_path / "seg" / "segmentation_head.safetensors"))[0]
    assert head["conv.weight"].shape[1] == 4 * 96  # the 4 blocks' tokens side by side
    out = capsys.readouterr().out
    assert "Resize" in r["protocol"]["transform"] and f"transform: {r['protocol']['transform']}" in out
    assert "mIoU" in out


def test_depth_on_one_block_writes_example_pngs(small_scenes, tmp_path, capsys):
    r = small_run("depth", small_scenes, tmp_path / "depth", "n_layers=1", "num_examples=2", "max_depth=15")
    assert r["protocol"]["blocks"] == [3] and np.isfinite([r["rmse"], r["abs_rel"], r["delta1"]]).all()
    assert f"transform: {r['protocol']['transform']}" in capsys.readouterr().out
    assert len(r["examples"]) == 2
    for png in r["examples"]:
        assert Path(png).parent == tmp_path / "depth" / "examples"
        with Image.open(png) as image:
            image.verify()  # a complete, valid file
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == (3 * 32 + 2 * 4, 32)  # image | truth | prediction
