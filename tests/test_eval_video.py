"""dinokit eval video: DAVIS-2017 statistics by hand (mean, recall, decay, the global mean over objects),
DINO's frame preprocessing, and the command on a tiny DAVIS-layout dataset tracked exactly by a ViT
without position embedding (frames rolled by whole JPEG blocks and patches), its resume and refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.cli import main
from dinokit.eval import video as video_module
from dinokit.eval.metrics import davis_global, davis_statistics, frame_jf, video_jf
from dinokit.eval.video import DinoFrameTransform
from dinokit.io import folder_lock
from dinokit.maps.tracking import labels_to_mask, one_hot_at_grid

P, GRID, STEP = 4, 32, 8  # patch size of vit_micro_p4; 32 x 32 patches (128 px); 8 px (a JPEG block) a frame
COLOURS = [0, 0, 0, 200, 0, 0, 0, 200, 0] + [9] * (768 - 9)


def test_davis_statistics_by_hand():
    """8 frames: bin edges round(linspace(1, 8, 5) + 1e-10) - 1 = 0, 2, 4 (4.5 rounds up, to 5), 5, 7; decay =
    mean of frames 0-2 - mean of frames 5-7; recall counts frames > 0.5 (0.5 itself is no hit)."""
    values = np.array([1.0, 1.0, 1.0, 0.8, 0.5, 0.4, 0.2, 0.0])
    mean, recall, decay = davis_statistics(values)
    assert mean == pytest.approx(4.9 / 8)
    assert recall == pytest.approx(4 / 8)
    assert decay == pytest.approx(1 - 0.6 / 3)
    assert davis_statistics(np.array([1.0, 1.0, 0.0, 0.0])) == (0.5, 0.5, 1.0)  # 4 frames: bins 0-1 ... 2-3


def test_global_results_average_objects_not_sequences():
    """A video of 1 perfect object and one of 2 objects (1 perfect, 1 found in half its frames): the global
    J-Mean is (1 + 1 + 0.5) / 3 over objects, where a mean of the videos' means would give 0.875."""
    truth = np.zeros((20, 20), dtype=np.uint8)
    truth[2:8, 2:8], truth[10:16, 10:16] = 1, 2
    only_one = np.where(truth == 2, 0, truth)
    one = video_jf([None, frame_jf(only_one, only_one, [1]), frame_jf(only_one, only_one, [1]), None], [1])
    frames = [frame_jf(truth, truth, [1, 2])] * 2 + [frame_jf(truth, only_one, [1, 2])] * 2  # 2 lost: J = F = 0
    two = video_jf([None, *frames, None], [1, 2])
    assert two["objects"]["2"] == {"J": 0.5, "F": 0.5, "J_recall": 0.5, "J_decay": 1.0, "F_recall": 0.5, "F_decay": 1.0}
    result = davis_global([one, two])
    assert result["J-Mean"] == pytest.approx(2.5 / 3) and result["F-Mean"] == pytest.approx(2.5 / 3)
    assert result["J&F-Mean"] == pytest.approx(2.5 / 3) and result["J-Recall"] == pytest.approx(2.5 / 3)
    assert result["J-Decay"] == pytest.approx(1 / 3) and result["F-Decay"] == pytest.approx(1 / 3)
    assert result["objects"] == 3 and (one["J_mean"] + two["J_mean"]) / 2 == pytest.approx(0.875)


def test_dino_frame_transform_sizes_and_values():
    """DINO's read_frame: 854 x 480 -> 832 x 480 (854 floored to a multiple of 64), portrait the same
    way; cut to whole patches (14: 476 x 826); an unresized frame is (x / 255 - mean) / std, std 0.228."""
    assert DinoFrameTransform(480, 16).output_size(480, 854) == (480, 832)
    assert DinoFrameTransform(480, 16).output_size(854, 480) == (832, 480)
    picture = np.zeros((480, 854, 3), dtype=np.uint8)
    assert DinoFrameTransform(480, 16)(picture).shape == (3, 480, 832)
    assert DinoFrameTransform(480, 14)(picture).shape == (3, 476, 826)
    rgb = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    x = DinoFrameTransform(64, 8)(rgb)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.228, 0.224, 0.225])
    expected = ((rgb / 255 - mean) / std).transpose(2, 0, 1)
    assert x.shape == (3, 64, 128) and np.allclose(x.numpy(), expected, atol=1e-6)


@pytest.fixture(scope="module")
def shuffle_model_file(tmp_path_factory):
    """A ViT without position embedding: frames rolled by whole patches have their features rolled."""
    torch.manual_seed(0)
    model = dinokit.create_model("vit_micro_p4", depth=2).eval()
    with torch.no_grad():
        model.pos_embed.zero_()
    return dinokit.export_model(model, tmp_path_factory.mktemp("model") / "m.safetensors")


def rendered(mask: np.ndarray) -> np.ndarray:
    """The mask as the tracker draws it from patch labels (bilinear upsampling rounds square corners)."""
    values = [0, *(int(v) for v in np.unique(mask) if v not in (0, 255))]
    clean = np.where(mask == 255, 0, mask)
    return labels_to_mask(one_hot_at_grid(clean, values, (GRID, GRID)), values, P, mask.shape)


def palette_png(mask: np.ndarray, path) -> None:
    image = Image.fromarray(mask.astype(np.uint8))
    image.putpalette(COLOURS)
    image.save(path)


def make_sequence(root, name: str, frames: int, objects: int, seed: int, lose_second_after: int | None = None):
    """Noise frames rolled 8 px (2 patches, a JPEG block: the JPEGs roll exactly) down and right a frame,
    objects of the first frame's noise as squares far from the seam; annotations: the tracker's exact
    drawing of them, rolled, void (255) in the background of the first and second; with
    `lose_second_after` object 2 is missing from the annotations of the frames from that one on."""
    noise = np.random.default_rng(seed).integers(0, 256, (GRID * P, GRID * P, 3), dtype=np.uint8)
    mask = np.zeros((GRID * P, GRID * P), dtype=np.uint8)
    mask[10 * P : 14 * P, 9 * P : 13 * P] = 1
    if objects == 2:
        mask[8 * P : 11 * P, 16 * P : 20 * P] = 2
    first = mask.copy()
    first[24 * P : 26 * P, 2 * P : 5 * P] = 255
    drawn = rendered(mask)
    (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
    (root / "Annotations" / "480p" / name).mkdir(parents=True)
    for t in range(frames):
        shift = (t * STEP, t * STEP)
        frame = np.roll(noise, shift, axis=(0, 1))
        Image.fromarray(frame).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95, subsampling=0)
        truth = first if t == 0 else np.roll(drawn, shift, axis=(0, 1))
        if t == 1:
            truth = np.where((truth == 0) & (np.arange(GRID * P)[None] < 8), 255, truth)  # void at the left
        if lose_second_after is not None and t >= lose_second_after:
            truth = np.where(truth == 2, 0, truth)
        palette_png(truth, root / "Annotations" / "480p" / name / f"{t:05d}.png")
    return drawn


@pytest.fixture()
def davis(tmp_path, shuffle_model_file):
    """DAVIS layout: alpha (4 frames, 1 object) and beta (6 frames, 2 objects, object 2 missing from the
    annotations of frames 3 and 4, so its J = F per frame are 1, 1, 0, 0)."""
    root = tmp_path / "DAVIS"
    drawn = {"alpha": make_sequence(root, "alpha", 4, 1, seed=1), "beta": make_sequence(root, "beta", 6, 2, 2, 3)}
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("alpha\nbeta\n")
    args = [f"model={shuffle_model_file}", f"data={root}", f"out={tmp_path / 'out'}", "image_size=128"]
    args += ["size_mask_neighborhood=3", "device=cpu", "num_workers=0"]
    return root, tmp_path / "out", args, drawn


def test_eval_video_tracks_every_sequence_and_scores_as_davis(davis, capsys):
    root, out, args, drawn = davis
    assert main(["eval", "video", *args]) == 0
    result = json.loads((out / "video.json").read_text())
    assert result["complete"] and list(result["sequences"]) == ["alpha", "beta"]
    alpha, beta = result["sequences"]["alpha"], result["sequences"]["beta"]
    assert (alpha["J_mean"], alpha["F_mean"], alpha["frames_scored"]) == (1, 1, 2)
    assert beta["objects"]["1"]["J"] == 1 and beta["objects"]["2"]["J"] == 0.5 and beta["frames_scored"] == 4
    assert beta["objects"]["2"]["J_decay"] == 1 and beta["objects"]["2"]["F_recall"] == 0.5
    g = result["global"]
    assert g["J-Mean"] == pytest.approx(2.5 / 3) and g["F-Mean"] == pytest.approx(2.5 / 3)  # not (1 + 0.75) / 2
    assert g["J-Decay"] == pytest.approx(1 / 3) and g["J-Recall"] == pytest.approx(2.5 / 3) and g["objects"] == 3
    protocol = result["protocol"]
    assert protocol["preprocessing"] == "dino" and "DinoFrameTransform(short_side=128" in protocol["transform"]
    assert protocol["weights_hash"] and protocol["n_last_frames"] == 7 and protocol["size_mask_neighborhood"] == 3
    for name, frames in (("alpha", 4), ("beta", 6)):
        first = np.asarray(Image.open(root / "Annotations" / "480p" / name / "00000.png"))
        for t in range(frames):
            written = Image.open(out / name / f"{t:05d}.png")
            assert written.mode == "P" and written.getpalette()[:9] == COLOURS[:9]
            expected = first if t == 0 else np.roll(drawn[name], (t * STEP, t * STEP), axis=(0, 1))
            assert np.array_equal(np.asarray(written), expected), (name, t)  # void tracked as background
    printed = capsys.readouterr().out
    assert "J&F-Mean" in printed and "F-Decay" in printed and "beta_2" in printed and "0.833" in printed


def test_a_rerun_keeps_finished_sequences_and_sequences_restricts(davis, monkeypatch):
    _, out, args, _ = davis
    tracked = []
    real = video_module.track_sequence

    def counting(net, video, *rest):
        tracked.append(video.name)
        return real(net, video, *rest)

    monkeypatch.setattr(video_module, "track_sequence", counting)
    assert main(["eval", "video", *args, "sequences=beta"]) == 0
    result = json.loads((out / "video.json").read_text())
    assert tracked == ["beta"] and list(result["sequences"]) == ["beta"] and not (out / "alpha").exists()
    assert result["global"]["J-Mean"] == pytest.approx(0.75) and result["global"]["objects"] == 2
    beta_scores = (out / "beta" / "scores.json").stat().st_mtime_ns
    assert main(["eval", "video", *args]) == 0  # beta finished: only alpha is tracked
    assert tracked == ["beta", "alpha"] and (out / "beta" / "scores.json").stat().st_mtime_ns == beta_scores
    assert json.loads((out / "video.json").read_text())["global"]["J-Mean"] == pytest.approx(2.5 / 3)
    (out / "alpha" / "scores.json").unlink()  # a run stopped inside alpha: its masks, no scores
    assert main(["eval", "video", *args]) == 0
    assert tracked == ["beta", "alpha", "alpha"]


def test_a_rerun_with_other_settings_and_a_second_run_are_refused(davis, capsys):
    _, out, args, _ = davis
    assert main(["eval", "video", *args, "sequences=alpha"]) == 0
    assert main(["eval", "video", *args, "sequences=alpha", "topk=3"]) == 2
    assert "holds results of another run" in capsys.readouterr().err
    with folder_lock(out, "a test"):  # another run holding out
        assert main(["eval", "video", *args, "sequences=alpha"]) == 2
    assert "another process is writing eval video results" in capsys.readouterr().err


def test_bad_layouts_are_named_with_their_fix(davis, capsys):
    root, out, args, _ = davis

    def error(*extra: str) -> str:
        assert main(["eval", "video", *args, *extra]) == 2
        assert not out.exists()
        return capsys.readouterr().err

    assert "sequences=gamma not in" in error("sequences=gamma,alpha")
    beta_annotation = root / "Annotations" / "480p" / "beta" / "00002.png"
    Image.open(beta_annotation).resize((64, 64)).save(beta_annotation)
    message = error("sequences=beta")
    assert f"the annotation {beta_annotation} is 64x64 pixels but the frames of beta are 128x128" in message
    beta_frame = root / "JPEGImages" / "480p" / "beta" / "00004.jpg"
    Image.open(beta_frame).crop((0, 0, 128, 120)).save(beta_frame)
    assert f"the frame {beta_frame} is 128x120 pixels" in error("sequences=beta")
    (root / "Annotations" / "480p" / "alpha" / "00002.png").unlink()
    assert "lacks 1 annotations of scored frames (e.g. 00002.png)" in error()
    (root / "Annotations" / "480p" / "alpha" / "00000.png").unlink()
    message = error()
    assert str(root / "Annotations" / "480p" / "alpha" / "00000.png") in message and "first frame" in message
    for png in (root / "Annotations" / "480p" / "beta").iterdir():
        png.unlink()
    (root / "Annotations" / "480p" / "beta").rmdir()
    assert "the sequence beta has no annotations" in error("sequences=beta")
    (root / "ImageSets" / "2017" / "val.txt").unlink()
    message = error()
    assert str(root / "ImageSets" / "2017" / "val.txt") in message and "DAVIS-2017 folder" in message


def test_dinokit_preprocessing_and_bf16_features(davis, capsys):
    """preprocessing=dinokit (the maps commands' transform; a 128 px frame stays 128 px) tracks alpha as
    exactly; bf16 features are recorded as such; an unknown preprocessing is named."""
    _, out, args, _ = davis
    assert main(["eval", "video", *args, "sequences=alpha", "preprocessing=dinokit", "precision=bf16"]) == 0
    result = json.loads((out / "video.json").read_text())
    assert result["global"]["J&F-Mean"] == 1 and result["protocol"]["precision"] == "bf16"
    assert "ResizeKeepAspect(short_side=128, patch_size=4" in result["protocol"]["transform"]
    assert "ReducedJpegDecode" not in result["protocol"]["transform"]  # FrameFiles decodes frames whole
    assert main(["eval", "video", *[a for a in args if "out=" not in a], f"out={out}2", "preprocessing=opencv"]) == 2
    assert "preprocessing must be dino" in capsys.readouterr().err and not (out.parent / "out2").exists()
