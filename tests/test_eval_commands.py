import json

import pytest

from dinokit.cli import main
from dinokit.data.synthetic import write_classification_set


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_classification_set(root, per_class=12, size=16, seed=0, split="train")
    write_classification_set(root, per_class=4, size=16, seed=1, split="val")
    (root / "val" / "star" / "broken.png").write_bytes(b"not a png")
    return root


COMMON = ["model=random:vit_nano_p2", "image_size=16", "num_workers=0", "batch_size=32"]


def test_eval_knn_writes_the_specified_json_and_a_table(shapes, tmp_path, capsys):
    args = [f"train={shapes / 'train'}", f"val={shapes / 'val'}", f"out={tmp_path / 'knn'}", f"cache={tmp_path / 'c'}"]
    assert main(["eval", "knn", *COMMON, *args, "few_shot=[2]", "few_shot_tries=2"]) == 0
    record = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert set(record) == {"top1", "top5", "protocol", "few_shot"}
    assert list(record["top1"]) == ["10", "20", "100", "200"] and list(record["top5"]) == ["10", "20", "100", "200"]
    assert all(0.0 <= v <= 100.0 for v in [*record["top1"].values(), *record["top5"].values()])
    p = record["protocol"]
    assert p["temperature"] == 0.07 and p["ks"] == [10, 20, 100, 200] and p["random_init"] is True
    assert p["train_images"] == 96 and p["val_images"] == 32 and p["val_bad_files"] == 1 and p["num_classes"] == 8
    assert "CenterCrop(size=(16, 16))" in p["transform"]
    assert record["few_shot"]["2"]["tries"] == 2
    out = capsys.readouterr().out
    assert "top-1" in out and "skipped 1 unreadable file" in out and "extracted" in out
    assert p["ks_above_bank"] == [100, 200]  # 96 train images: k = 100 and 200 vote with all of them
    assert "note: k = 100, 200 exceed the 96 train images: those vote with all of them" in out
    # a second command reuses the cached features (k-NN and linear share the entry)
    args[2] = f"out={tmp_path / 'lin'}"
    assert main(["eval", "linear", *COMMON, *args, "epochs=2", "learning_rates=[0.01, 0.1]"]) == 0
    out = capsys.readouterr().out
    assert "features reused" in out and "capped at 2" in out
    linear = json.loads((tmp_path / "lin" / "linear.json").read_text())
    assert {"top1", "top5", "selected", "selection", "protocol"} <= set(linear)
    assert len(linear["selection"]["scores"]) == 2 * 2 * 2 and (tmp_path / "lin" / "linear_head.safetensors").exists()


def test_a_logreg_rerun_replaces_the_head_of_the_earlier_sgd_run(shapes, tmp_path):
    """eval linear rerun into one out= with method=logreg kept the sgd run's linear_head.safetensors
    beside a linear.json that is not its result; now each method writes its own chosen head."""
    from dinokit.eval.heads import load_head_file

    args = [f"train={shapes / 'train'}", f"val={shapes / 'val'}", f"out={tmp_path / 'lin'}", f"cache={tmp_path / 'c'}"]
    assert main(["eval", "linear", *COMMON, *args, "epochs=1", "learning_rates=[0.01]"]) == 0
    assert load_head_file(tmp_path / "lin" / "linear_head.safetensors")[1]["method"] == "sgd"
    assert main(["eval", "linear", *COMMON, *args, "method=logreg", "logreg_values=3"]) == 0
    protocol = json.loads((tmp_path / "lin" / "linear.json").read_text())["protocol"]
    assert protocol["method"] == "logreg" and protocol["optimiser"] == "lbfgs"
    assert "epochs" not in protocol and "train_batch_size" not in protocol  # sgd's keys: logreg uses neither
    state, meta = load_head_file(tmp_path / "lin" / "linear_head.safetensors", "classification")
    assert meta["method"] == "logreg" and (meta["n_last_blocks"], meta["avgpool"]) == (1, False)
    assert state["weight"].shape == (8, 32) and state["bias"].shape == (8,)  # 8 shapes, vit_nano width 32


def test_eval_commands_reject_bad_input_with_a_fix(shapes, tmp_path, capsys):
    base = [f"train={shapes / 'train'}", f"val={shapes / 'val'}", f"out={tmp_path}", "cache=none"]
    assert main(["eval", "knn", *COMMON[:1], "image_size=15", *base]) == 2
    assert "image_size 15 is not a multiple of the patch size 2; use 14 or 16" in capsys.readouterr().err
    assert main(["eval", "knn", *COMMON, f"train={tmp_path / 'missing'}", *base[1:]]) == 2
    assert "labelled dataset not found" in capsys.readouterr().err
    assert main(["eval", "linear", *COMMON, *base, "n_last_blocks=[0]"]) == 2
    assert "n_last_blocks must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("temperature=0", "temperature must be > 0"),
        ("temperature=-0.07", "temperature must be > 0"),
        ("few_shot=[0, 5]", "few_shot must be positive numbers of images per class"),
        ("few_shot_tries=0", "few_shot_tries must be >= 1"),
    ],
)
def test_eval_knn_refuses_settings_that_gave_meaningless_accuracies(tmp_path, capsys, key, message):
    """temperature=0 (votes divided by zero) and few_shot=[0] (an empty bank) printed accuracies that
    looked like results; few_shot_tries=0 failed after the features were extracted."""
    args = [f"train={tmp_path / 'train'}", f"val={tmp_path / 'val'}", f"out={tmp_path / 'knn'}", "few_shot=[1]"]
    assert main(["eval", "knn", *COMMON, *args, key]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("learning_rates=[]", "learning_rates must be a non-empty list of positive rates"),
        ("learning_rates=[0.1, 0]", "learning_rates must be a non-empty list of positive rates"),
        ("avgpool=[]", "avgpool must be a non-empty list"),
        ("epochs=0", "epochs must be >= 1"),
        ("train_batch_size=0", "train_batch_size must be >= 1"),
        ("selection_fraction=0", "selection_fraction must be between 0 and 1"),
        ("selection_fraction=1.5", "selection_fraction must be between 0 and 1"),
    ],
)
def test_eval_linear_refuses_settings_that_were_silently_replaced(tmp_path, capsys, key, message):
    """learning_rates=[] / avgpool=[] trained the default grid while linear.json recorded the empty one,
    epochs=0 reported untrained heads as the probe, and selection_fraction 0 or 1.5 was clamped to one
    image per class / all but one while the record named the fraction given."""
    args = [f"train={tmp_path / 'train'}", f"val={tmp_path / 'val'}", f"out={tmp_path / 'lin'}"]
    assert main(["eval", "linear", *COMMON, *args, key]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "missing"),
    [("knn", "val"), ("linear", "val"), ("linear", "selection")],
)
def test_a_missing_split_fails_before_any_feature_is_extracted(shapes, tmp_path, capsys, monkeypatch, command, missing):
    """eval knn with a mistyped val= extracted all of train's features before saying val was not found."""
    import dinokit.eval.common

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted before every split was read")

    monkeypatch.setattr(dinokit.eval.common, "cached_features", no_extraction)
    splits = {"train": shapes / "train", "val": shapes / "val", "selection": shapes / "val"}
    splits[missing] = tmp_path / "typo"
    args = [f"{name}={path}" for name, path in splits.items() if command == "linear" or name != "selection"]
    assert main(["eval", command, *COMMON, *args, f"out={tmp_path / 'out'}", "cache=none"]) == 2
    assert f"labelled dataset not found: {tmp_path / 'typo'}" in capsys.readouterr().err
