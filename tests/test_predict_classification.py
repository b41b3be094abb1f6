"""`dinokit predict classification`: a saved classifier (eval linear's head) applied to new images."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dinokit.cli import main
from dinokit.data.synthetic import write_classification_set
from dinokit.eval.heads import load_head_file
from dinokit.eval.linear import classifier_logits, linear_classifier

COMMON = ["image_size=16", "num_workers=0", "batch_size=32", "precision=fp32"]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """An eval linear run (sgd) on rendered shapes, its backbone saved as a file."""
    from safetensors.torch import save_file

    from dinokit import create_model

    root = tmp_path_factory.mktemp("predict")
    write_classification_set(root, per_class=12, size=16, seed=0, split="train")
    write_classification_set(root, per_class=4, size=16, seed=1, split="val")
    (root / "val" / "star" / "broken.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    backbone = root / "nano.safetensors"
    save_file(create_model("vit_nano_p2").state_dict(), str(backbone))
    args = [f"model={backbone}", f"train={root / 'train'}", f"val={root / 'val'}", f"cache={root / 'cache'}"]
    assert main(["eval", "linear", *COMMON, *args, f"out={root / 'lin'}", "epochs=3", "learning_rates=[0.1]"]) == 0
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_reproduce_the_probe_accuracy_on_its_val_split(probe, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    head = probe / "lin" / "linear_head.safetensors"
    assert main(["predict", "classification", f"head={head}", f"images={probe / 'val'}", f"out={out}", "k=3"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable image" in printed and "32 predictions written" in printed
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "class", "probability", "class_2", "probability_2", "class_3", "probability_3"]
    assert len(rows) == 32
    for row in rows:
        probs = [float(row[k]) for k in ("probability", "probability_2", "probability_3")]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    correct = sum(Path(r["path"]).parent.name == r["class"] for r in rows)
    reported = json.loads((probe / "lin" / "linear.json").read_text())["top1"]
    assert 100.0 * correct / len(rows) == pytest.approx(reported)


def test_json_output_a_head_folder_and_k_capped_at_the_classes(probe, tmp_path):
    out = tmp_path / "pred.json"
    one = sorted((probe / "val" / "circle").iterdir())[0]
    assert main(["predict", "classification", f"head={probe / 'lin'}", f"images={one}", f"out={out}", "k=50"]) == 0
    (row,) = json.loads(out.read_text())
    assert row["path"] == str(one) and len(row["predictions"]) == 8  # 8 classes
    assert sum(p["probability"] for p in row["predictions"]) == pytest.approx(1.0, abs=1e-5)


def test_the_head_is_refused_for_another_backbone_task_or_format(probe, tmp_path, capsys):
    from dinokit.eval.heads import save_head

    head = probe / "lin" / "linear_head.safetensors"
    images = f"images={probe / 'val'}"
    assert main(["predict", "classification", f"head={head}", images, "model=random:vit_nano_p2"]) == 2
    assert "weights hash" in capsys.readouterr().err
    assert main(["predict", "classification", f"head={head}", images, f"out={tmp_path / 'p.txt'}"]) == 2
    assert "must end in .csv or .json" in capsys.readouterr().err
    state, meta = load_head_file(head)
    save_head(tmp_path / "seg.safetensors", state, {**meta, "task": "segmentation"})
    assert main(["predict", "classification", f"head={tmp_path / 'seg.safetensors'}", images]) == 2
    err = capsys.readouterr().err
    assert "is a segmentation head, not a classification head" in err and "dinokit predict segmentation" in err


@pytest.mark.parametrize("classes", [[0, 1], [0, 1, 3, 4]])  # binary; multinomial with class 2 unseen
def test_a_logreg_head_gives_scikit_learns_probabilities(classes):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6))
    y = np.array(classes)[rng.integers(0, len(classes), 60)]
    model = LogisticRegression(max_iter=500).fit(x, y)
    num_classes = max(classes) + 1
    tensors = linear_classifier(model, {"C": 1.0}, num_classes)
    block_cls = torch.from_numpy(x).float()[:, None]  # (B, 1, D): the final CLS only
    probs = classifier_logits(tensors["weight"], tensors["bias"], block_cls, None, 1, False).softmax(-1)
    expected = np.zeros((60, num_classes))
    expected[:, model.classes_] = model.predict_proba(x)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-5)
