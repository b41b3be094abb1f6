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


@pytest.fixture(scope="module")
def one_class(tmp_path_factory):
    """train and val folders of a single class."""
    import numpy as np

    from tests.conftest import random_images

    root = tmp_path_factory.mktemp("one_class")
    rng = np.random.default_rng(0)
    random_images(root / "train" / "cat", 4, 16, rng)
    random_images(root / "val" / "cat", 2, 16, rng)
    return root


@pytest.mark.parametrize("command", [["knn"], ["linear", "epochs=1"], ["linear", "method=logreg", "logreg_values=2"]])
def test_classification_of_a_single_class_is_refused(one_class, tmp_path, capsys, command):
    """One class in train: knn and linear (sgd) reported 100% as a result, logreg crashed in
    scikit-learn (ValueError: needs samples of at least 2 classes)."""
    args = [f"train={one_class / 'train'}", f"val={one_class / 'val'}", f"out={tmp_path / 'o'}", "cache=none"]
    common = ["model=random:vit_nano_p2", "image_size=16", "num_workers=0"]
    assert main(["eval", command[0], *common, *args, *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "one class (cat)" in err and "two or more" in err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    """train/ and val/ folders of classes cat and dog, 4 and 2 noise images each."""
    import numpy as np

    from tests.conftest import random_images

    root = tmp_path_factory.mktemp("two_classes")
    rng = np.random.default_rng(1)
    for name in ("cat", "dog"):
        random_images(root / "train" / name, 4, 16, rng)
        random_images(root / "val" / name, 2, 16, rng)
    return root


@pytest.mark.parametrize(
    ("command", "splits", "named"),
    [
        (["linear", "epochs=1"], {"train": "train", "val": "val", "selection": "val"}, "selection"),
        (["linear", "epochs=1"], {"train": "train", "val": "train"}, "train"),
        (["knn"], {"train": "train", "val": "train"}, "train"),
    ],
)
def test_the_reported_split_must_share_no_image_with_train_or_selection(
    two_classes, tmp_path, capsys, command, splits, named
):
    """selection=val chose the head on the split it then reported (the official script's flaw that
    eval linear promises to avoid), and val=train searched each query in a bank holding itself: both
    were accepted and reported as results."""
    args = [f"{key}={two_classes / folder}" for key, folder in splits.items()]
    common = ["model=random:vit_nano_p2", "image_size=16", "num_workers=0", "cache=none", f"out={tmp_path / 'o'}"]
    assert main(["eval", command[0], *common, *args, *command[1:]]) == 2
    err = capsys.readouterr().err
    assert f"share {8 if splits['val'] == 'train' else 4} images" in err and f"{named}=" in err
    assert not (tmp_path / "o").exists()


def test_a_val_class_that_train_lacks_is_named_with_its_cause(two_classes, tmp_path, capsys):
    """A val label with a typo, or a class whose train folder is empty, gave 'has classes not in the
    reference class list' without naming train, its classes or a fix."""
    import shutil

    train = tmp_path / "train"
    shutil.copytree(two_classes / "train", train)
    (train / "bird").mkdir()  # an empty class folder
    val_csv = tmp_path / "val.csv"
    rows = [f"{p},{p.parent.name}" for p in sorted((two_classes / "val").rglob("*.png"))]
    rows[-1] = rows[-1].replace(",dog", ",dgo")
    val_csv.write_text("\n".join(["path,label", *rows, f"{rows[0].split(',')[0]},bird"]) + "\n")
    common = ["model=random:vit_nano_p2", "image_size=16", "num_workers=0", "cache=none", f"out={tmp_path / 'o'}"]
    assert main(["eval", "knn", *common, f"train={train}", f"val={val_csv}"]) == 2
    err = capsys.readouterr().err
    assert f"labels that are no class of {train}: ['bird', 'dgo']" in err
    assert "classes: cat, dog" in err and "typo" in err and f"{train / 'bird'} holds no image" in err


@pytest.fixture(scope="module")
def dense_scenes(tmp_path_factory):
    from dinokit.data.synthetic import write_dense_set

    return write_dense_set(tmp_path_factory.mktemp("dense") / "train", 3, size=16, seed=0)


DENSE = ["model=random:vit_nano_p2", "image_size=16", "epochs=1", "cache=none", "num_workers=0", "precision=fp32"]


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_a_dense_train_batch_size_below_one_is_refused_before_any_work(dense_scenes, tmp_path, capsys, task):
    """train_batch_size=0 ended eval segmentation / depth in a ZeroDivisionError traceback after the
    features were extracted (and an earlier run's results in out= removed)."""
    args = [f"train={dense_scenes}", f"val={dense_scenes}", f"out={tmp_path / 'o'}", *DENSE, "train_batch_size=0"]
    assert main(["eval", task, *args]) == 2
    assert "train_batch_size must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("depth_scale=0", "depth_scale must be > 0"),
        ("depth_scale=-1000", "depth_scale must be > 0"),
    ],
)
def test_eval_depth_refuses_a_depth_scale_that_is_not_positive(dense_scenes, tmp_path, capsys, key, message):
    """depth_scale=0 divided the 16-bit depths by zero and reported NaN errors with exit 0;
    depth_scale=-1000 was told that the maps 'hold no measurement (all 0)'."""
    args = [f"train={dense_scenes}", f"val={dense_scenes}", f"out={tmp_path / 'o'}", *DENSE, key]
    assert main(["eval", "depth", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "depth.json").exists()


def test_a_val_mask_class_beyond_num_classes_fails_before_training(dense_scenes, tmp_path, capsys):
    """A val mask holding a class the train masks lack was found only while evaluating, after the
    head was trained and the earlier run's results in out= were removed."""
    import shutil

    import numpy as np
    from PIL import Image

    val = tmp_path / "val"
    shutil.copytree(dense_scenes, val)
    mask_path = sorted((val / "masks").glob("*.png"))[0]
    mask = np.asarray(Image.open(mask_path)).copy()
    top = max(int(np.asarray(Image.open(p)).max()) for p in (dense_scenes / "masks").glob("*.png"))
    mask[0, 0] = top + 1
    Image.fromarray(mask).save(mask_path)
    out = tmp_path / "o"
    assert main(["eval", "segmentation", f"train={dense_scenes}", f"val={dense_scenes}", f"out={out}", *DENSE]) == 0
    capsys.readouterr()
    assert main(["eval", "segmentation", f"train={dense_scenes}", f"val={val}", f"out={out}", *DENSE]) == 2
    assert f"holds class {top + 1} but num_classes={top + 1}" in capsys.readouterr().err
    assert (out / "segmentation.json").exists() and (out / "segmentation_head.safetensors").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"embed_dim": 192, "future_option": 1}', "options this dinokit does not know: ['future_option']"),
        ("{bad", "its dinokit_config metadata is not a JSON object"),
        ("[1, 2]", "its dinokit_config metadata is not a JSON object"),
    ],
)
def test_a_dinokit_file_with_a_config_this_version_cannot_read_is_named(nano_weights, tmp_path, config, message):
    """A dinokit file whose stored config names an option this version lacks (a newer dinokit's
    export) or is damaged ended load_model in a TypeError / JSONDecodeError traceback."""
    from safetensors.torch import load_file, save_file

    from dinokit.errors import DinokitError

    path = tmp_path / "model.safetensors"
    save_file(load_file(nano_weights), path, metadata={"dinokit_config": config})
    with pytest.raises(DinokitError, match=message.replace("[", r"\[").replace("]", r"\]")):
        dinokit.load_model(path)


def test_few_shot_knn_uses_the_official_ks_of_each_shot(two_classes, tmp_path):
    """The official few-shot k-NN (dinov2/eval/knn.py: create_module_dict) votes with the ks not above
    n per class, and k = n itself; eval knn voted with every k (10, 20, 100, 200) over banks of
    n x classes images, i.e. with the whole bank, and reported that as k = 200."""
    import json

    args = [f"train={two_classes / 'train'}", f"val={two_classes / 'val'}", f"out={tmp_path / 'o'}", "cache=none"]
    common = ["model=random:vit_nano_p2", "image_size=16", "num_workers=0", "few_shot_tries=2"]
    assert main(["eval", "knn", *common, *args, "ks=[1, 2, 10]", "few_shot=[1, 3]"]) == 0
    record = json.loads((tmp_path / "o" / "knn.json").read_text())
    assert list(record["top1"]) == ["1", "2", "10"]  # the full bank: the ks asked for
    assert list(record["few_shot"]["1"]["top1"]) == ["1"] and list(record["few_shot"]["3"]["top1"]) == ["1", "2", "3"]
    assert list(record["few_shot"]["3"]["top5"]) == ["1", "2", "3"]
    assert record["protocol"]["few_shot_ks"] == {"1": [1], "3": [1, 2, 3]}


def test_a_csv_line_with_an_empty_label_is_named(two_classes, tmp_path):
    """`a.png,` (a label left out in a spreadsheet) made a class named '' of its images, silently."""
    from dinokit.data.labelled import read_labelled
    from dinokit.errors import DinokitError

    images = sorted((two_classes / "train").rglob("*.png"))
    listing = tmp_path / "train.csv"
    listing.write_text(f"{images[0]},cat\n{images[5]},dog\n{images[6]},\n")
    with pytest.raises(DinokitError, match=f"the line naming {images[6]} has an empty label"):
        read_labelled(listing)


def test_a_one_bit_mask_reads_as_classes_0_and_1(tmp_path):
    """A binary mask saved from a boolean array (Image.fromarray(mask > 0): mode "1") was refused as
    holding 'colours', not class indices."""
    import numpy as np
    from PIL import Image

    from dinokit.eval.dense import read_mask

    truth = np.array([[True, False, False], [False, True, True]])
    Image.fromarray(truth).save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "1"
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == np.int64 and np.array_equal(mask, truth.astype(np.int64))


@pytest.mark.parametrize("key", ["learning_rates=[0.1, 0.1]", "avgpool=[true, true]", "n_last_blocks=[1, 1]"])
def test_a_linear_grid_value_given_twice_is_one_head(two_classes, tmp_path, key):
    """A value repeated in learning_rates / avgpool / n_last_blocks put one head's parameters in two
    optimizer groups: a ValueError traceback after the features were extracted."""
    import json

    args = [f"train={two_classes / 'train'}", f"val={two_classes / 'val'}", f"out={tmp_path / 'o'}", "cache=none"]
    common = ["model=random:vit_nano_p2", "image_size=16", "num_workers=0", "epochs=1"]
    grid = ["learning_rates=[0.1]", "avgpool=[false]", "n_last_blocks=[1]"]
    grid = [key if g.split("=")[0] == key.split("=")[0] else g for g in grid]
    assert main(["eval", "linear", *common, *args, *grid]) == 0
    record = json.loads((tmp_path / "o" / "linear.json").read_text())
    assert len(record["selection"]["scores"]) == 1
    once = {"n_last_blocks": [1], "avgpool": [key.startswith("avgpool")], "learning_rates": [0.1]}
    assert record["protocol"]["grid"] == once


def test_head_grid_holds_each_configuration_once():
    from dinokit.eval.linear import head_grid

    assert len(head_grid((1, 4, 1), (False, False), (0.1, 0.1, 0.2))) == 2 * 1 * 2


def test_logreg_values_below_one_is_refused_before_any_work(two_classes, tmp_path, capsys):
    """method=logreg logreg_values=0 swept no C and ended in 'max() arg is an empty sequence' (a
    ValueError traceback) after the features were extracted."""
    args = [f"train={two_classes / 'train'}", f"val={two_classes / 'val'}", f"out={tmp_path / 'o'}", "cache=none"]
    common = ["model=random:vit_nano_p2", "image_size=16", "num_workers=0", "method=logreg", "logreg_values=0"]
    assert main(["eval", "linear", *common, *args]) == 2
    assert "logreg_values must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["segmentation", "depth"])
@pytest.mark.parametrize(
    ("key", "message"),
    [("lr=-0.001", "lr must be > 0"), ("lr=0", "lr must be > 0"), ("weight_decay=-1", "weight_decay must be >= 0")],
)
def test_dense_probe_optimiser_settings_are_checked_before_any_work(dense_scenes, tmp_path, capsys, task, key, message):
    """lr < 0 or weight_decay < 0 ended in AdamW's ValueError traceback after the features were
    extracted; lr=0 reported the untrained head as the probe."""
    args = [f"train={dense_scenes}", f"val={dense_scenes}", f"out={tmp_path / 'o'}", *DENSE, key]
    assert main(["eval", task, *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_a_damaged_head_file_is_named_by_predict(nano_weights, tmp_path, capsys, task):
    """predict with a truncated or non-safetensors head= ended in a SafetensorError traceback."""
    import numpy as np
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    for content in (b"not a head file", nano_weights.read_bytes()[:200]):
        head = tmp_path / f"{task}_head.safetensors"
        head.write_bytes(content)
        args = [f"head={head}", f"images={tmp_path / 'images'}", f"out={tmp_path / 'out'}", "num_workers=0"]
        assert main(["predict", task, *args]) == 2
        err = capsys.readouterr().err
        assert f"{head} is not a readable head file" in err and f"eval {task}" in err


def test_a_run_folder_without_its_final_backbone_names_its_newest_checkpoint(tmp_path):
    """A pretraining run still going on (or stopped) has checkpoints/ but no backbone.safetensors yet:
    model=<run folder> was told the folder lacks config.json and to 'pass a weights file'."""
    from dinokit.errors import DinokitError

    (tmp_path / "checkpoints").mkdir()
    for iteration in (100, 2000):
        (tmp_path / "checkpoints" / f"checkpoint_{iteration:08d}.pt").write_bytes(b"")
    (tmp_path / "metrics.jsonl").write_text("")
    newest = tmp_path / "checkpoints" / "checkpoint_00002000.pt"
    with pytest.raises(DinokitError, match=f"no backbone.safetensors yet.*{newest}"):
        dinokit.load_model(tmp_path)


def test_the_feature_cache_keys_the_precision_that_ran(two_classes, monkeypatch):
    """Where bf16 falls back to fp32 (an older GPU, MPS), features computed in fp32 were cached under
    precision 'bf16', and read back as bf16 features by a run on a bf16 device sharing the cache."""
    import warnings

    from dinokit import runtime
    from dinokit.data.transforms import eval_transform
    from dinokit.eval.cache import cached_features

    model = dinokit.create_model("vit_nano_p2").eval()
    paths = sorted((two_classes / "train").rglob("*.png"))[:2]
    kw = dict(cache_dir=None, num_workers=0, progress=False)

    def key(precision: str) -> str:
        return cached_features(model, paths, eval_transform(16), precision=precision, **kw).key

    assert key("bf16") != key("fp32")  # the CPU runs bf16
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's own warning
        assert key("bf16") == key("fp32")  # bf16 asked, fp32 ran: the same features
        from dinokit.eval.common import Backbone, protocol_record

        backbone = Backbone(model, "m", "m", "hash", False)
        assert protocol_record(backbone, eval_transform(16), 16, "bf16")["precision"] == "fp32"
