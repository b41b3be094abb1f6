"""`dinokit eval segmentation|depth head=... val=DIR`: a saved or released dense head scored on a labelled split.

The scores must be those of `predict`'s own outputs against the ground truth, computed here by hand with numpy
(mmseg's mIoU; the Monocular-Depth-Estimation-Toolbox's depth metrics and crops). Released heads are written in
the official format with random weights for a tiny backbone (the helpers of the released-head tests)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_released_depth import official_linear, save_released
from test_released_segmentation import official_head_file

from dinokit import create_model, export_model
from dinokit.cli import main
from dinokit.data.synthetic import write_dense_set
from dinokit.errors import DinokitError
from dinokit.eval import head_scores
from dinokit.eval.common import prepare_backbone
from dinokit.eval.head_scores import eval_crop, kb_crop, reduce_zero_label
from dinokit.eval.released_depth import load_released_depth_head
from tests.conftest import perturb_scales_and_norms

DIM = 96  # vit_micro_p4
SIZES = {"a": (20, 28), "b": (16, 24), "sub/c": (24, 20)}  # (H, W) of the val images


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A tiny backbone file and a val split: random images with ADE20K-style masks (0 = other, 1..150, a few
    255) and KITTI-style 16-bit depth PNGs (1/256 m, 0 = no measurement)."""
    root = tmp_path_factory.mktemp("head_scores")
    torch.manual_seed(0)
    weights = export_model(perturb_scales_and_norms(create_model("vit_micro_p4")).eval(), root / "micro.safetensors")
    rng = np.random.default_rng(0)
    val = root / "val"
    for name, (h, w) in SIZES.items():
        for sub in ("images", "masks", "depth"):
            (val / sub / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(val / "images" / f"{name}.png")
        mask = rng.integers(0, 6, (h, w)).astype(np.uint8)  # 0 = other, classes 1..5 (0..4 once reduced)
        mask[0, :3] = 150  # the last ADE20K class
        mask[1, :2] = 255
        Image.fromarray(mask).save(val / "masks" / f"{name}.png")
        depth = rng.integers(1, 30 * 256, (h, w)).astype(np.uint16)
        depth[rng.random((h, w)) < 0.2] = 0
        Image.fromarray(depth).save(val / "depth" / f"{name}.png")
    return {"root": root, "weights": str(weights), "val": val}


def refused(argv: list[str], capsys) -> str:
    """The error `dinokit <argv>` stops with (exit status 2)."""
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def scores(command: str, *args: str) -> dict:
    assert main(["eval", command, *args]) == 0
    out = next(a.split("=", 1)[1] for a in args if a.startswith("out="))
    return json.loads((Path(out) / f"{command}.json").read_text())


# ------------------------------------------------------------------------------------------- by hand
def miou_by_hand(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int, ignore: int) -> tuple[float, float]:
    """(mIoU %, aAcc %) as mmseg: intersections and unions summed over the split, IoU of classes with union > 0."""
    inter, union, correct, labelled = np.zeros(num_classes), np.zeros(num_classes), 0, 0
    for pred, truth in pairs:
        keep = truth != ignore
        p, t = pred[keep], truth[keep]
        for c in range(num_classes):
            inter[c] += np.sum((p == c) & (t == c))
            union[c] += np.sum((p == c) | (t == c))
        correct += np.sum(p == t)
        labelled += t.size
    present = union > 0
    return 100 * float(np.mean(inter[present] / union[present])), 100 * correct / labelled


def ade20k_scores_of_pngs(folder: Path, val: Path) -> tuple[float, float]:
    """(mIoU %, aAcc %) by hand of predict's class PNGs in folder against val's ADE20K-style masks, reduced as
    mmseg's reduce_zero_label (0 and 255 -> 255, k -> k - 1), 150 classes."""
    pairs = []
    for name in SIZES:
        pred = np.asarray(Image.open(folder / f"{name}.png")).astype(np.int64)
        mask = np.asarray(Image.open(val / "masks" / f"{name}.png")).astype(np.int64)
        pairs.append((pred, np.where((mask == 0) | (mask == 255), 255, mask - 1)))
    return miou_by_hand(pairs, 150, 255)


def toolbox_metrics(gt: np.ndarray, pred: np.ndarray) -> dict:
    """The toolbox's `calculate` (depth/core/evaluation/metrics.py) on the valid pixels; deltas in %."""
    thresh = np.maximum(gt / pred, pred / gt)
    err = np.log(pred) - np.log(gt)
    return {
        "delta1": 100 * (thresh < 1.25).mean(),
        "delta2": 100 * (thresh < 1.25**2).mean(),
        "delta3": 100 * (thresh < 1.25**3).mean(),
        "abs_rel": np.mean(np.abs(gt - pred) / gt),
        "sq_rel": np.mean((gt - pred) ** 2 / gt),
        "rmse": np.sqrt(np.mean((gt - pred) ** 2)),
        "rmse_log": np.sqrt(np.mean((np.log(gt) - np.log(pred)) ** 2)),
        "silog": np.sqrt(np.mean(err**2) - np.mean(err) ** 2) * 100,
        "log10": np.mean(np.abs(np.log10(gt) - np.log10(pred))),
    }


# -------------------------------------------------------------------------------------------- tests
def test_reduce_zero_label_maps_as_mmseg():
    mask = np.array([[0, 1, 2], [150, 255, 7]], dtype=np.uint8)
    assert reduce_zero_label(mask).tolist() == [[255, 0, 1], [149, 255, 6]]


def test_eval_crops_keep_exactly_the_toolbox_pixels():
    # garg on 50 x 100: rows int(0.40810811 * 50) = 20 .. int(0.99189189 * 50) = 49 (excluded), columns 3 .. 96
    keep = eval_crop((50, 100), "garg")
    expected = np.zeros((50, 100), dtype=bool)
    expected[20:49, 3:96] = True
    assert np.array_equal(keep, expected) and keep.sum() == 29 * 93
    # KITTI's 375 x 1242: rows 153 .. 371, columns 44 .. 1197 (Python slices: the ends excluded)
    kitti = eval_crop((375, 1242), "garg")
    rows, cols = np.nonzero(kitti.any(1))[0], np.nonzero(kitti.any(0))[0]
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (153, 371, 44, 1197)
    # KITTI's KB crop of a 375 x 1242 map: the bottom 352 rows (23 .. 374), columns int(26 / 2) = 13 .. 1228;
    # kb_garg then keeps rows int(0.40810811 * 352) = 143 .. 348, columns 43 .. 1171 of the cut map
    grid = np.arange(375 * 1242).reshape(375, 1242)
    cut = kb_crop(grid)
    assert cut.shape == (352, 1216) and cut[0, 0] == grid[23, 13] and cut[-1, -1] == grid[374, 1228]
    kept = eval_crop(cut.shape, "kb_garg")
    rows, cols = np.nonzero(kept.any(1))[0], np.nonzero(kept.any(0))[0]
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (143, 349, 43, 1172)
    with pytest.raises(DinokitError, match=r"352 x 1216; one of 351 x 1242 is smaller: pass crop=garg"):
        kb_crop(grid[:351])
    nyu = eval_crop((480, 640), "eigen")
    expected = np.zeros((480, 640), dtype=bool)
    expected[45:471, 41:601] = True
    assert np.array_equal(nyu, expected) and nyu.sum() == 426 * 560
    assert eval_crop((3, 4), "none").all()
    with pytest.raises(DinokitError, match=r"480 x 640.*crop=none"):
        eval_crop((50, 100), "eigen")


def test_a_released_segmentation_head_scores_what_predict_writes(micro, tmp_path, capsys):
    """An ADE20K-named linear head (150 classes, so ADE20K's names; reduce_zero_label on by default): the json's
    mIoU / aAcc / per-class IoU are those of predict segmentation's PNGs against the reduced masks, by hand."""
    head = tmp_path / "micro_ade20k_linear_head.pth"  # no released backbone in the name: model= is given
    official_head_file(head, DIM, 150)
    common = [f"head={head}", f"model={micro['weights']}", "image_size=32", "precision=fp32", "device=cpu"]
    assert main(["predict", "segmentation", *common, f"images={micro['val'] / 'images'}", f"out={tmp_path / 'p'}"]) == 0
    result = scores("segmentation", *common, f"val={micro['val']}", f"out={tmp_path / 's'}", "num_examples=2")
    miou, aacc = ade20k_scores_of_pngs(tmp_path / "p", micro["val"])
    assert len(np.unique(np.asarray(Image.open(tmp_path / "p" / "a.png")))) > 1  # the head predicts several classes
    assert result["protocol"]["scales"] == [1.0] and result["protocol"]["flip"] is False  # a linear head's
    assert result["miou"] == pytest.approx(miou, abs=1e-9)
    assert result["pixel_accuracy"] == pytest.approx(aacc, abs=1e-9)
    assert result["classes"][0] == "wall" and len(result["iou_per_class"]) == 150
    protocol = result["protocol"]
    assert protocol["reduce_zero_label"] is True and protocol["ignore_index"] == 255
    assert protocol["val_images"] == 3 and protocol["val_bad_files"] == 0 and protocol["image_size"] == 32
    assert [Path(p).name for p in result["examples"]] == ["a.png", "b.png"]
    assert "mIoU" in capsys.readouterr().out
    # without the mapping, ADE20K's label 150 is out of the head's 0..149: the fix is named
    argv = ["eval", "segmentation", *common, f"val={micro['val']}", f"out={tmp_path / 'r'}", "reduce_zero_label=false"]
    error = refused(argv, capsys)
    assert "holds class 150, but the head predicts 150 classes (0..149)" in error and "reduce_zero_label=true" in error


def test_an_ms_head_is_scored_with_the_configs_five_ratios_where_predict_uses_the_notebooks_three(micro, tmp_path):
    """eval segmentation head= scores an ms head as its published "+ms" numbers were measured: the released configs'
    img_ratios [1.0, 1.32, 1.73, 2.28, 3.0] with flips (a copy of dinov2_vits14_voc2012_ms_config.py); predict
    segmentation keeps the notebook's first 3. The json records the ratios that ran: its scores are those of
    predict's PNGs made with those ratios, by hand; scales= sets them in either command."""
    head = tmp_path / "micro_ade20k_ms_head.pth"  # 4 blocks wide: an ms head
    official_head_file(head, 4 * DIM, 150)
    common = [f"head={head}", f"model={micro['weights']}", "image_size=16", "precision=fp32", "device=cpu"]
    images, val = f"images={micro['val'] / 'images'}", f"val={micro['val']}"
    five, three = [1.0, 1.32, 1.73, 2.28, 3.0], [1.0, 1.32, 1.73]
    assert main(["predict", "segmentation", *common, images, f"out={tmp_path / 'p3'}"]) == 0
    record = json.loads((tmp_path / "p3" / "classes.json").read_text())
    assert (record["kind"], record["scales"], record["flip"]) == ("ms", three, True)
    assert (
        main(["predict", "segmentation", *common, images, f"out={tmp_path / 'p5'}", "scales=[1.0,1.32,1.73,2.28,3.0]"])
        == 0
    )
    by_hand = {n: ade20k_scores_of_pngs(tmp_path / f"p{n}", micro["val"]) for n in (3, 5)}
    assert by_hand[3] != by_hand[5]  # the two protocols' masks score differently here: the test tells them apart
    result = scores("segmentation", *common, val, f"out={tmp_path / 's'}")
    assert (result["protocol"]["scales"], result["protocol"]["flip"]) == (five, True)
    assert (result["miou"], result["pixel_accuracy"]) == pytest.approx(by_hand[5], abs=1e-9)
    # scales= overrides the default, and the json records it
    notebook = scores("segmentation", *common, val, f"out={tmp_path / 's3'}", "scales=[1.0,1.32,1.73]")
    assert (notebook["protocol"]["scales"], notebook["protocol"]["flip"]) == (three, True)
    assert (notebook["miou"], notebook["pixel_accuracy"]) == pytest.approx(by_hand[3], abs=1e-9)


def test_a_released_depth_head_scores_what_predict_computes(micro, tmp_path, capsys):
    """A KITTI-named linear4 head: range 0.001-80 m, PNGs in 1/256 m; crop=garg (these maps are smaller than
    the default kb_garg's 352 x 1216, which says so); the json's errors are the toolbox's metrics of predict's
    depths averaged with the mirror images' (the released configs' flip=True), per image, averaged."""
    head = save_released(tmp_path / "micro_kitti_linear4_head.pth", official_linear(4, 80.0))
    common = [f"head={head}", f"model={micro['weights']}", "precision=fp32", "device=cpu"]
    error = refused(["eval", "depth", *common, f"val={micro['val']}", f"out={tmp_path / 's'}"], capsys)
    assert "crop=kb_garg cuts images and depth maps to KITTI's benchmark size 352 x 1216" in error
    assert "pass crop=garg" in error
    result = scores("depth", *common, f"val={micro['val']}", f"out={tmp_path / 's'}", "crop=garg")
    depther = load_released_depth_head(str(head), micro["weights"], "cpu", precision="fp32")
    flipped = load_released_depth_head(str(head), micro["weights"], "cpu", precision="fp32", flip=True)
    assert main(["predict", "depth", *common, f"images={micro['val'] / 'images'}", f"out={tmp_path / 'p'}"]) == 0
    rows = []
    for name in SIZES:
        png = np.asarray(Image.open(tmp_path / "p" / f"{name}.png")) / 256.0  # predict's own file: no flip
        assert np.abs(png - depther.predict(micro["val"] / "images" / f"{name}.png")).max() <= 0.5 / 256 + 1e-6
        pred = flipped.predict(micro["val"] / "images" / f"{name}.png")
        gt = np.asarray(Image.open(micro["val"] / "depth" / f"{name}.png")).astype(np.float32) / 256.0
        h, w = gt.shape
        crop = np.zeros_like(gt, dtype=bool)
        crop[int(0.40810811 * h) : int(0.99189189 * h), int(0.03594771 * w) : int(0.96405229 * w)] = True
        valid = (gt > 1e-3) & (gt < 80) & crop
        rows.append(toolbox_metrics(gt[valid].astype(np.float64), pred[valid].astype(np.float64)))
    for key in rows[0]:
        assert result[key] == pytest.approx(np.mean([r[key] for r in rows]), rel=1e-6), key
    protocol = result["protocol"]
    assert (protocol["crop"], protocol["depth_scale"], protocol["range"]) == ("garg", 256.0, [0.001, 80.0])
    assert protocol["flip"] is True
    assert result["images"] == 3 and protocol["val_bad_files"] == 0
    backbone = prepare_backbone(micro["weights"], "cpu")  # recorded as every protocol records its backbone
    assert (protocol["model_description"], protocol["weights_hash"]) == (backbone.description, backbone.hash)
    # crop=none scores every valid pixel: other numbers
    other = scores("depth", *common, f"val={micro['val']}", f"out={tmp_path / 's'}", "crop=none")
    assert other["rmse"] != pytest.approx(result["rmse"]) and other["protocol"]["crop"] == "none"


def test_a_kitti_head_is_scored_on_kitti_benchmark_crops_by_default(micro, tmp_path, monkeypatch):
    """crop=auto for a KITTI head is the released KITTI configs' protocol: the image cut by KBCrop (bottom rows,
    middle columns) before predicting, the ground truth by the toolbox's eval_kb_crop, then garg of the cut
    map. KITTI's 352 x 1216 is shrunk here to 12 x 19 for the tiny images (the same rule, by hand)."""
    monkeypatch.setattr(head_scores, "KB_CROP", (12, 19))
    head = save_released(tmp_path / "micro_kitti_linear4_head.pth", official_linear(4, 80.0))
    common = [f"head={head}", f"model={micro['weights']}", "precision=fp32", "device=cpu"]
    result = scores("depth", *common, f"val={micro['val']}", f"out={tmp_path / 's'}")
    flipped = load_released_depth_head(str(head), micro["weights"], "cpu", precision="fp32", flip=True)
    rows = []
    for name, (h, w) in SIZES.items():
        top, left = h - 12, (w - 19) // 2  # a: rows 8..19, columns 4..22; b: 4..15, 2..20; c: 12..23, 0..18
        rgb = np.asarray(Image.open(micro["val"] / "images" / f"{name}.png"))[top : top + 12, left : left + 19]
        pred = flipped.predict(Image.fromarray(rgb))
        gt = np.asarray(Image.open(micro["val"] / "depth" / f"{name}.png")).astype(np.float32) / 256.0
        gt = gt[top : top + 12, left : left + 19]
        crop = np.zeros_like(gt, dtype=bool)
        crop[int(0.40810811 * 12) : int(0.99189189 * 12), int(0.03594771 * 19) : int(0.96405229 * 19)] = True
        valid = (gt > 1e-3) & (gt < 80) & crop
        rows.append(toolbox_metrics(gt[valid].astype(np.float64), pred[valid].astype(np.float64)))
    for key in rows[0]:
        assert result[key] == pytest.approx(np.mean([r[key] for r in rows]), rel=1e-6), key
    assert result["protocol"]["crop"] == "kb_garg" and result["images"] == 3


def test_a_trained_head_scored_on_its_own_val_split_gives_the_training_runs_scores(micro, tmp_path):
    """eval segmentation trains a head, then head= scores its file on the same val split: exactly the scores of
    predict segmentation's masks (by hand), and the training run's up to the float16 rounding of the features
    that the training run evaluates from its cache (predict computes them in float32). Depth likewise."""
    data = tmp_path / "scenes"
    write_dense_set(data / "train", 12, size=32, seed=0)
    write_dense_set(data / "val", 6, size=32, seed=1)
    train = [f"model={micro['weights']}", f"train={data / 'train'}", "image_size=32", "epochs=3", "cache=none"]
    common = [f"val={data / 'val'}", "precision=fp32", "num_workers=0", "device=cpu"]
    trained = scores("segmentation", *train, *common, f"out={tmp_path / 'seg'}")
    head = tmp_path / "seg" / "segmentation_head.safetensors"
    scored = scores("segmentation", f"head={head}", *common, f"out={tmp_path / 's'}")
    predict = [f"head={head}", f"images={data / 'val' / 'images'}", f"out={tmp_path / 'p'}", "num_workers=0"]
    assert main(["predict", "segmentation", *predict, "precision=fp32", "device=cpu"]) == 0
    pairs = [
        (
            np.asarray(Image.open(path)).astype(np.int64),
            np.asarray(Image.open(tmp_path / "p" / path.name)).astype(np.int64),
        )[::-1]
        for path in sorted((data / "val" / "masks").glob("*.png"))
    ]
    miou, aacc = miou_by_hand(pairs, trained["protocol"]["num_classes"], 255)
    assert scored["miou"] == pytest.approx(miou, abs=1e-9) and scored["pixel_accuracy"] == pytest.approx(aacc, abs=1e-9)
    assert scored["miou"] == pytest.approx(trained["miou"], abs=0.01)
    assert scored["pixel_accuracy"] == pytest.approx(trained["pixel_accuracy"], abs=0.01)
    assert scored["protocol"]["model"] == trained["protocol"]["model"]
    assert scored["protocol"]["reduce_zero_label"] is False
    # depth: the same, the training run's three errors over the same pixels (none at exactly max_depth here)
    trained = scores("depth", *train, *common, f"out={tmp_path / 'depth'}")
    scored = scores("depth", f"head={tmp_path / 'depth' / 'depth_head.safetensors'}", *common, f"out={tmp_path / 'd'}")
    for key in ("rmse", "abs_rel", "delta1"):
        assert scored[key] == pytest.approx(trained[key], rel=1e-5), key  # float16 features in training
    assert scored["protocol"]["crop"] == "none" and scored["protocol"]["depth_scale"] == 1000.0


def test_bad_inputs_are_refused_with_the_fix(micro, tmp_path, capsys):
    head = tmp_path / "head.pth"
    official_head_file(head, DIM, 7)
    val, out = f"val={micro['val']}", f"out={tmp_path / 'out'}"
    model = f"model={micro['weights']}"
    no_masks = tmp_path / "no_masks"
    (no_masks / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(no_masks / "images" / "x.png")
    cases = [
        (["segmentation", f"head={head}", model, f"val={no_masks}", out], "must hold images/ and masks/ folders"),
        # a released head of the other task, before any download
        (["segmentation", "head=dinov2_vits14_nyu_linear4_head", val, out], "score it with `dinokit eval depth`"),
        (["depth", "head=dinov2_vits14_ade20k_ms_head", val, out], "score it with `dinokit eval segmentation`"),
        (["segmentation", f"head={head}", model, f"train={micro['val']}", val, out], "train= and head= exclude"),
        (["segmentation", f"head={head}", model, val, out, "epoch=3"], "unknown key 'epoch'"),
        (["depth", f"head={head}", model, val, out, "crop=centre"], "crop must be one of auto, none, eigen, garg"),
        (["segmentation", model, f"train={micro['val']}", val, out, "flip=true"], "apply to scoring a head"),
        (["depth", val, out], "model=... and train=... are needed to train a head"),
        (["segmentation", f"head={head}", model, out], "val=... is needed"),
    ]
    for argv, message in cases:
        assert message in refused(["eval", *argv], capsys), argv
    # a dinokit head file of the other task
    depth_head = tmp_path / "depth"
    write_dense_set(tmp_path / "scenes", 4, size=16, seed=0)
    tiny = [f"train={tmp_path / 'scenes'}", f"val={tmp_path / 'scenes'}", "image_size=16", "epochs=1", "cache=none"]
    assert main(["eval", "depth", model, *tiny, f"out={depth_head}", "num_workers=0", "precision=fp32"]) == 0
    error = refused(["eval", "segmentation", f"head={depth_head / 'depth_head.safetensors'}", val, out], capsys)
    assert "is a depth head, not a segmentation head: score it with `dinokit eval depth`" in error
    # scoring into a training run's out would remove its head
    error = refused(
        ["eval", "depth", f"head={depth_head / 'depth_head.safetensors'}", val, f"out={depth_head}"], capsys
    )
    assert "holds a trained head (depth_head.safetensors)" in error
    assert (depth_head / "depth_head.safetensors").is_file()


def test_unreadable_or_misfit_pairs_are_skipped_and_counted_and_a_rerun_replaces_the_examples(micro, tmp_path):
    import shutil

    val = tmp_path / "val"
    shutil.copytree(micro["val"], val)
    (val / "images" / "broken.png").write_bytes(b"not a png")  # an unreadable image
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(val / "masks" / "broken.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(val / "images" / "small.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(val / "masks" / "small.png")  # a mask of another size
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(val / "images" / "cut.png")
    (val / "masks" / "cut.png").write_bytes(b"\x89PNG\r\n")  # an unreadable mask
    head = tmp_path / "micro_ade20k_linear_head.pth"
    official_head_file(head, DIM, 150)
    common = [f"head={head}", f"model={micro['weights']}", "image_size=32", "precision=fp32", f"val={val}"]
    first = scores("segmentation", *common, f"out={tmp_path / 's'}", "num_examples=3")
    assert first["protocol"]["val_images"] == 3 and first["protocol"]["val_bad_files"] == 3
    assert len(list((tmp_path / "s" / "examples").rglob("*.png"))) == 3
    again = scores("segmentation", *common, f"out={tmp_path / 's'}", "num_examples=1")
    assert again["miou"] == first["miou"]
    assert [p.name for p in (tmp_path / "s" / "examples").rglob("*.png")] == ["a.png"]


def test_a_val_path_with_a_parent_step_names_its_examples(micro, tmp_path, monkeypatch):
    """val=../../val/../val: the example panels are named by the pairs' keys (pathlib refused the unplain path)."""
    head = tmp_path / "head.pth"
    official_head_file(head, DIM, 150)
    monkeypatch.chdir(micro["val"] / "images")
    args = [f"head={head}", f"model={micro['weights']}", "image_size=32", "reduce_zero_label=true"]
    args.append("val=../../val/../val")
    result = scores("segmentation", *args, f"out={tmp_path / 's'}", "num_examples=1")
    assert [Path(p).name for p in result["examples"]] == ["a.png"] and result["protocol"]["val_images"] == 3
