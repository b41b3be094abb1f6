"""`dinokit demo` end to end on a tiny preset: data split, pretraining, k-NN against random init, report."""

import re

import pytest
import yaml
from pretrain_helpers import TINY, tiny_images

from dinokit.demo import demo, prepare_data
from dinokit.train.metrics_log import read_metrics


def test_prepare_data_holds_out_every_fifth_image_per_class(tmp_path):
    folder = tiny_images(tmp_path / "images", per_class=5)
    data = prepare_data(tmp_path / "out", str(folder))
    assert len(data["classes"]) == 8
    assert len(data["train"]) == 32 and len(data["test"]) == 8  # one of each class's 5 images held out
    assert sorted(data["test_labels"]) == list(range(8))
    assert not set(data["train"]) & set(data["test"])
    assert data["listing"].read_text().count("\n") == 32


def test_prepare_data_without_classes_uses_every_image(tmp_path):
    folder = tiny_images(tmp_path / "images", per_class=2) / "circle"  # one folder of images, no classes
    data = prepare_data(tmp_path / "out", str(folder))
    assert data["train_labels"] is None and len(data["train"]) == 2 and len(data["test"]) == 1


def test_demo_writes_report_with_learned_and_random_init(tmp_path):
    preset = tmp_path / "tiny.yaml"
    keys = {k: v for k, v in TINY.items() if k != "preset"}
    preset.write_text(yaml.safe_dump({**keys, "max_minutes": 0.01, "epochs": None}))  # stops on the clock
    folder = tiny_images(tmp_path / "images", per_class=5)
    report = demo(out=str(tmp_path / "demo"), data=str(folder), preset=str(preset), image_size=16)
    text = (tmp_path / "demo" / "report.md").read_text()
    assert report.endswith("report.md") and "held-out images (16 px)" in text
    for line in ("k-NN top-1 (k=20), learned", "same network at random init", "raw pixels", "view retrieval"):
        assert line in text
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 1000
    iterations = int(re.search(r"(\d+) iterations = ", text).group(1))
    rows = read_metrics(tmp_path / "demo" / "run" / "metrics.jsonl")
    assert rows[-1]["iteration"] == iterations  # the last steps are logged even between log points
    # the k-NN monitor's last value (the loss.png curve) is the table's learned k-NN (same protocol)
    monitor = [row for row in rows if "knn_top1" in row]
    learned = float(re.search(r"k-NN top-1 \(k=20\), learned \| ([\d.]+)", text).group(1))
    assert monitor[-1]["iteration"] == iterations and abs(monitor[-1]["knn_top1"] - learned) <= 0.05


def test_object_set_writes_every_shape_at_the_size(tmp_path):
    from PIL import Image

    from dinokit.data.synthetic import SHAPES
    from dinokit.demo import write_object_set

    split = write_object_set(tmp_path, per_class=2, size=32, seed=0, split="train")
    files = sorted(split.glob("*/*.png"))
    assert len(files) == 2 * len(SHAPES)
    assert {Image.open(f).size for f in files} == {(32, 32)}
    assert {f.parent.name for f in files} == set(SHAPES)


def test_demo_writes_an_out_under_the_home_folder_there(tmp_path, monkeypatch):
    """demo(out="~/demo") from Python (no shell to expand it) wrote into a folder named '~' in the
    current folder, as the commands before bd3aeb7 did. Stopped at its pretraining: the data is laid out."""
    import dinokit.demo

    class Reached(Exception):
        pass

    def stop(**_):
        raise Reached

    folder = tiny_images(tmp_path / "images", per_class=5)
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(dinokit.demo, "pretrain", stop)
    with pytest.raises(Reached):
        demo(out="~/demo", data=str(folder), image_size=16)
    assert list(elsewhere.iterdir()) == [] and (home / "demo" / "run").is_dir()
