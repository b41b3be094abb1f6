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


@pytest.mark.parametrize("blocks", [1, 4])
def test_a_released_dinov2_linear_head_predicts_as_the_official_classifier(tmp_path, blocks):
    """A released ImageNet-1k linear head (.pth: weight (1000, (1 + n) D), bias) applied as the official
    hub's `_LinearClassifierWrapper` computes: the normed CLS of the last n blocks, then the last block's
    mean normed patch token, at 224 px (resize 256, centre crop), into 1000 ImageNet classes."""
    from PIL import Image
    from torchvision.models import ResNet50_Weights

    from dinokit import create_model, export_model
    from dinokit.data.transforms import eval_transform

    imagenet = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(imagenet) == 1000 and imagenet[0] == "tench" and imagenet[999] == "toilet tissue"
    torch.manual_seed(0)
    net = create_model("vit_micro_p4").eval()  # 96 wide, 4 blocks
    weights = export_model(net, tmp_path / "micro.safetensors")
    head = {"weight": torch.randn(1000, (1 + blocks) * 96), "bias": torch.randn(1000)}
    torch.save(head, tmp_path / "my_head.pth")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    args = ["predict", "classification", f"head={tmp_path / 'my_head.pth'}", f"model={weights}"]
    out = tmp_path / "p.json"
    assert main([*args, f"images={tmp_path}", f"out={out}", "k=3", "num_workers=0", "precision=fp32"]) == 0
    rows = {Path(r["path"]).name: r["predictions"] for r in json.loads(out.read_text())}

    transform = eval_transform(224, reduced_decode=False)
    for name, predicted in rows.items():
        x = transform(Image.open(tmp_path / name).convert("RGB"))[None]
        with torch.no_grad():
            if blocks == 1:
                f = net.forward_features(x)
                inputs = torch.cat([f["x_norm_clstoken"], f["x_norm_patchtokens"].mean(dim=1)], dim=1)
            else:
                layers = net.get_intermediate_layers(x, n=4, return_class_token=True)
                inputs = torch.cat([*(cls for _, cls in layers), layers[3][0].mean(dim=1)], dim=1)
            probs, top = torch.nn.functional.linear(inputs, head["weight"], head["bias"]).softmax(-1).topk(3)
        assert [p["class"] for p in predicted] == [imagenet[i] for i in top[0].tolist()]
        assert np.allclose([p["probability"] for p in predicted], probs[0].numpy(), atol=1e-4)


def test_released_linear_heads_by_name_and_what_a_wrong_one_is_told(tmp_path, monkeypatch):
    from dinokit import create_model, export_model
    from dinokit.errors import DinokitError
    from dinokit.eval.heads import official_linear_head
    from dinokit.models import hub

    assert hub.released_head_url("dinov2_vitb14_reg_linear4_head") == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_linear4_head.pth"
    )
    assert hub.released_head_url("dinov2_vits14_linear_head").endswith("/dinov2_vits14/dinov2_vits14_linear_head.pth")
    assert hub.released_head("/downloads/dinov2_vitl14_reg4_linear_head.pth") == hub.HeadName(
        "dinov2_vitl14_reg", "classification", None, "linear"
    )
    assert hub.released_head_url("dinov2_vits14") is None and hub.released_head("head.pth") is None

    weights = export_model(create_model("vit_micro_p4"), tmp_path / "micro.safetensors")
    torch.save({"weight": torch.zeros(1000, 3 * 96), "bias": torch.zeros(1000)}, tmp_path / "three.pth")
    with pytest.raises(DinokitError, match=r"not a DINOv2 linear head for model=.*weight \(1000, 288\)"):
        official_linear_head(str(tmp_path / "three.pth"), str(weights), "cpu")
    with pytest.raises(DinokitError, match="pass the backbone it was trained on as model="):
        official_linear_head(str(tmp_path / "three.pth"), None, "cpu")
    torch.save(torch.zeros(1000, 2 * 96), tmp_path / "tensor.pth")  # a bare tensor: was a RuntimeError
    with pytest.raises(DinokitError, match=r"not a DINOv2 linear head for model=.*this file a Tensor"):
        official_linear_head(str(tmp_path / "tensor.pth"), str(weights), "cpu")

    def offline(url, dst, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    with pytest.raises(DinokitError, match=r"offline.*head=/path/to/dinov2_vits14_linear4_head.pth"):
        official_linear_head("dinov2_vits14_linear4_head", str(weights), "cpu")
