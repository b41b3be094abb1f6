"""Defects found reviewing the reduced JPEG decode, the k-NN monitor and the released linear heads."""

from pathlib import Path

import pytest
import yaml

from dinokit.errors import DinokitError


def saved_without(out: Path, settings: dict, key: str) -> None:
    """A run folder whose config.yaml predates `key` (as a run started before the key existed)."""
    out.mkdir(parents=True)
    values = {k: v for k, v in settings.items() if k != key}
    (out / "config.yaml").write_text(yaml.safe_dump({**values, "out": str(out)}))


def test_a_pretraining_run_saved_before_reduced_decode_resumes_decoding_whole(tmp_path):
    """Such a run decoded its JPEGs whole: resumed, it must go on doing so (not switch to today's
    default), and reduced_decode=false must not be refused as a change of its settings."""
    from dinokit.train.config import resolve_config
    from dinokit.train.pretrain import run_config

    out = tmp_path / "run"
    saved_without(out, resolve_config("cpu32", {}).to_dict(), "reduced_decode")
    assert run_config(out, None, {}, resume=True)[0].reduced_decode is False
    assert run_config(out, None, {"reduced_decode": False}, resume=True)[0].reduced_decode is False
    with pytest.raises(DinokitError, match="reduced_decode"):
        run_config(out, None, {"reduced_decode": True}, resume=True)


def test_a_finetuning_run_saved_before_reduced_decode_resumes_decoding_whole(tmp_path):
    from dinokit.train.finetune import run_config
    from dinokit.train.finetune_config import resolve_config

    out = tmp_path / "run"
    settings = resolve_config({"model": "random:vit_micro_p4", "train": "a", "val": "b"}).to_dict()
    saved_without(out, settings, "reduced_decode")
    assert run_config(out, {}, resume=True)[0].reduced_decode is False
    assert run_config(out, {"reduced_decode": False}, resume=True)[0].reduced_decode is False


def test_predict_classification_decodes_jpegs_as_the_head_was_trained(tmp_path, monkeypatch):
    """A released head saw the official transform (JPEGs decoded whole); an eval linear head of today
    the reduced decode; an older dinokit head (no reduced_decode in its record) whole. predict applied
    the reduced decode to all three."""
    import numpy as np
    import torch
    from PIL import Image

    from dinokit import create_model, export_model
    from dinokit.cli import main
    from dinokit.data.images import decode_min_side
    from dinokit.data.synthetic import write_classification_set
    from dinokit.eval import heads

    seen = []

    def spy(backbone, paths, meta, which, transform, **loader):
        seen.append(decode_min_side(transform))
        return real(backbone, paths, meta, which, transform, **loader)

    real = heads.head_inputs
    monkeypatch.setattr(heads, "head_inputs", spy)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    torch.manual_seed(0)
    weights = export_model(create_model("vit_micro_p4"), tmp_path / "micro.safetensors")
    torch.save({"weight": torch.randn(1000, 2 * 96), "bias": torch.randn(1000)}, tmp_path / "h.pth")
    common = [f"images={tmp_path / 'a.jpg'}", "num_workers=0", "precision=fp32"]
    assert main(["predict", "classification", f"head={tmp_path / 'h.pth'}", f"model={weights}", *common,
                 f"out={tmp_path / 'p.json'}"]) == 0  # fmt: skip
    assert seen == [None]  # whole, as the official transform

    write_classification_set(tmp_path / "set", per_class=4, size=16, seed=0, split="train")
    write_classification_set(tmp_path / "set", per_class=2, size=16, seed=1, split="val")
    args = [f"model={weights}", f"train={tmp_path / 'set/train'}", f"val={tmp_path / 'set/val'}", "image_size=16"]
    lin = tmp_path / "lin"
    assert main(["eval", "linear", *args, "num_workers=0", "precision=fp32", "cache=none", f"out={lin}",
                 "epochs=1", "learning_rates=[0.1]"]) == 0  # fmt: skip
    assert main(["predict", "classification", f"head={lin}", *common, f"out={tmp_path / 'q.json'}"]) == 0
    assert seen[1] == 2 * round(16 * 256 / 224)  # as its features were extracted: reduced

    head = lin / "linear_head.safetensors"  # a head written before the key: its features decoded whole
    state, meta = heads.load_head_file(head)
    del meta["reduced_decode"]
    heads.save_head(head, state, meta)
    assert main(["predict", "classification", f"head={lin}", *common, f"out={tmp_path / 'r.json'}"]) == 0
    assert seen[2] is None


def test_a_released_head_is_refused_on_a_backbone_of_another_shape_than_its_name_says(tmp_path):
    """dinov2_vits14_reg4_linear_head.pth with model=dinov2_vits14 (no registers, same width 384) gave
    ImageNet classes of the wrong backbone without an error."""
    import torch

    from dinokit.eval.heads import official_linear_head

    head = tmp_path / "dinov2_vits14_reg4_linear_head.pth"
    torch.save({"weight": torch.zeros(1000, 2 * 384), "bias": torch.zeros(1000)}, head)
    shapes = r"registers \(384, 12, 14, 4\).*has \(384, 12, 14, 0\): pass model=dinov2_vits14_reg"
    with pytest.raises(DinokitError, match=shapes):
        official_linear_head(str(head), "random:dinov2_vits14", "cpu")
    _, meta, _ = official_linear_head(str(head), "random:dinov2_vits14_reg", "cpu")
    assert meta["layers"] == [11] and meta["n_last_blocks"] == 1


def test_eval_knn_and_linear_decode_jpegs_whole_with_reduced_decode_false(tmp_path):
    """The official evaluation decodes whole (docs/reproducing.md's commands); eval knn and eval linear
    had no reduced_decode key, so every large JPEG of train and val was read at a reduced scale."""
    import json

    from dinokit.cli import main
    from dinokit.data.synthetic import write_classification_set

    write_classification_set(tmp_path / "set", per_class=3, size=16, seed=0, split="train")
    write_classification_set(tmp_path / "set", per_class=2, size=16, seed=1, split="val")
    args = ["model=random:vit_micro_p4", f"train={tmp_path / 'set/train'}", f"val={tmp_path / 'set/val'}"]
    common = [*args, "image_size=16", "num_workers=0", "precision=fp32", "cache=none", "reduced_decode=false"]
    assert main(["eval", "knn", *common, f"out={tmp_path / 'knn'}", "ks=[2]"]) == 0
    assert main(["eval", "linear", *common, f"out={tmp_path / 'lin'}", "epochs=1", "learning_rates=[0.1]"]) == 0
    for record in (tmp_path / "knn" / "knn.json", tmp_path / "lin" / "linear.json"):
        transform = json.loads(record.read_text())["protocol"]["transform"]
        assert transform.startswith("Resize(") and "ReducedJpegDecode" not in transform


def test_a_released_classifier_saved_whole_gives_its_linear_head(tmp_path):
    """torch.save(torch.hub.load(..., "dinov2_vits14_lc").state_dict()): backbone.* and linear_head.*
    keys. It was refused as 'not a DINOv2 linear head', listing backbone keys, with no fix."""
    import torch

    from dinokit import create_model
    from dinokit.eval.heads import official_linear_head

    net = create_model("vit_micro_p4")
    weight, bias = torch.randn(1000, 5 * 96), torch.randn(1000)
    whole = {**{f"backbone.{k}": v for k, v in net.state_dict().items()}, "linear_head.weight": weight}
    torch.save({**whole, "linear_head.bias": bias}, tmp_path / "lc.pth")
    state, meta, _ = official_linear_head(str(tmp_path / "lc.pth"), "random:vit_micro_p4", "cpu")
    assert torch.equal(state["weight"], weight) and torch.equal(state["bias"], bias)
    assert meta["n_last_blocks"] == 4 and meta["layers"] == [0, 1, 2, 3]


def test_an_eval_linear_folder_named_like_a_released_head_is_read_as_a_dinokit_head(tmp_path, monkeypatch):
    """eval linear out=.../dinov2_vits14_linear_head, then predict head= that folder: it was taken for
    the released head's name (dinov2_vits14 downloaded, then 'head file not found: <the folder>')."""
    from dinokit.cli import main
    from dinokit.data.synthetic import write_classification_set

    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))  # nothing cached: a download would fail here
    monkeypatch.setattr("torch.hub.download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    write_classification_set(tmp_path / "set", per_class=3, size=16, seed=0, split="train")
    write_classification_set(tmp_path / "set", per_class=2, size=16, seed=1, split="val")
    out = tmp_path / "dinov2_vits14_linear_head"
    args = ["model=random:vit_micro_p4", f"train={tmp_path / 'set/train'}", f"val={tmp_path / 'set/val'}"]
    common = ["num_workers=0", "precision=fp32", "image_size=16"]
    assert main(["eval", "linear", *args, *common, "cache=none", f"out={out}", "epochs=1", "learning_rates=[0.1]"]) == 0
    predictions = tmp_path / "p.csv"
    assert main(["predict", "classification", f"head={out}", f"images={tmp_path / 'set/val'}", f"out={predictions}",
                 "num_workers=0", "precision=fp32"]) == 0  # fmt: skip
    assert len(predictions.read_text().splitlines()) == 1 + 2 * 8


def test_the_knn_monitor_refuses_what_eval_knn_refuses(tmp_path):
    """knn_val=knn_train (every query its own neighbour: a top-1 near 100 whatever the features) and a
    one-class bank were monitored; the monitor said it equals `dinokit eval knn`, which refuses both."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from pretrain_helpers import run, tiny_images

    data = tiny_images(tmp_path / "data")
    with pytest.raises(DinokitError, match=r"knn_train / knn_val .*share 32 images"):
        run(data, tmp_path / "a", max_iterations=2, knn_every=1, knn_train=str(data), knn_val=str(data))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    one = tmp_path / "one"
    (one / "circle").mkdir(parents=True)
    for path in sorted((data / "circle").iterdir()):
        (one / "circle" / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DinokitError, match=r"knn_train / knn_val .*one class \(circle\)"):
        run(data, tmp_path / "b", max_iterations=2, knn_every=1, knn_train=str(one), knn_val=str(data))
