"""dinokit track: DINO's label propagation (hand-computed steps, the neighbourhood window, a network
whose features follow the video exactly), DAVIS's J and F by hand, and the command end to end."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.cli import main
from dinokit.eval.metrics import boundary_f, boundary_map, frame_jf, jaccard, video_jf
from dinokit.maps import tracking
from dinokit.maps.pca import patch_features
from dinokit.maps.tracking import labels_to_mask, one_hot_at_grid, propagate_labels, track

P, GRID = 4, 16  # patch size of vit_micro_p4; frames of 16 x 16 patches (64 px)


def test_propagate_labels_by_hand():
    """2 x 2 target patches, one context frame, topk = 2: weights exp(cos / 0.1) of the two best context
    patches, normalised; a tie at the k-th affinity keeps every tied patch (as DINO's `aff < min`)."""
    context = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]).reshape(1, 2, 2, 2)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.25, 0.75], [1.0, 0.0]])  # (patch, C) soft labels
    target = 3 * torch.tensor([[0.8, 0.6], [0.6, 0.8], [-0.6, 0.8], [0.0, -1.0]]).reshape(2, 2, 2)  # not unit
    soft = propagate_labels(target, context, labels.T.reshape(1, 2, 2, 2), topk=2, size_mask_neighborhood=0)
    e = math.exp

    def mix(weights: dict[int, float]) -> list[float]:
        total = sum(weights.values())
        return [sum(w * labels[i, c].item() for i, w in weights.items()) / total for c in range(2)]

    expected = [
        mix({0: e(8), 1: e(6)}),  # cos 0.8 with patch 0, 0.6 with patch 1
        mix({1: e(8), 0: e(6)}),
        mix({1: e(8), 2: e(6)}),
        mix({3: e(10), 0: e(0), 2: e(0)}),  # patches 0 and 2 tie at cos 0: both kept
    ]
    assert soft.shape == (2, 2, 2)
    assert soft.permute(1, 2, 0).reshape(4, 2).numpy() == pytest.approx(np.array(expected), rel=1e-6)


def test_a_context_patch_outside_the_neighbourhood_never_contributes():
    """1 x 8 patches: the context patch equal to target patch 0 lies 7 patches away; with a window of 2
    only patches 0-2 (background) count, so patch 0 stays pure background; without one the far
    patch (object) wins."""
    rng = np.random.default_rng(0)
    context = torch.from_numpy(rng.normal(size=(1, 1, 8, 16)).astype(np.float32))
    target = context[0].clone()
    target[0, 0] = context[0, 0, 7]  # the global best match of target patch 0 is context patch 7
    labels = torch.zeros(1, 2, 1, 8)
    labels[0, 0, 0, :7], labels[0, 1, 0, 7] = 1, 1  # patch 7 is the object
    windowed = propagate_labels(target, context, labels, topk=5, size_mask_neighborhood=2)
    assert windowed[:, 0, 0].tolist() == [1.0, 0.0]
    anywhere = propagate_labels(target, context, labels, topk=5, size_mask_neighborhood=0)
    assert anywhere[1, 0, 0] > 0.99


def test_chunks_of_target_patches_give_the_whole_step(monkeypatch):
    """Memory bound: target patches in chunks of a few rows give the same labels as all at once."""
    torch.manual_seed(0)
    target, context, labels = torch.randn(5, 7, 8), torch.randn(3, 5, 7, 8), torch.rand(3, 4, 5, 7)
    whole = propagate_labels(target, context, labels, topk=4, size_mask_neighborhood=2)
    monkeypatch.setattr(tracking, "CHUNK_ELEMENTS", 3 * 5 * 7 * 3)  # 3 target patches a chunk
    assert torch.allclose(propagate_labels(target, context, labels, topk=4, size_mask_neighborhood=2), whole)


@pytest.fixture(scope="module")
def shuffle_model():
    """No position embedding: a ViT is then equivariant to permutations of its patch tokens, so a frame
    rolled by whole patches has its features rolled the same way (up to float rounding)."""
    torch.manual_seed(0)
    model = dinokit.create_model("vit_micro_p4", depth=2).eval()
    with torch.no_grad():
        model.pos_embed.zero_()
    return model


def rolled_video(frames: int, step: int, seed: int = 0) -> tuple[list[torch.Tensor], np.ndarray]:
    """A noise image rolled by `step` patches down and right per frame, and its first mask: objects 1
    (3 x 3 patches) and 3 (2 x 3 patches), kept clear of the wrap-around seam for 4 frames."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.normal(0, 1, (3, GRID * P, GRID * P)).astype(np.float32))
    mask = np.zeros((GRID * P, GRID * P), dtype=np.uint8)
    mask[3 * P : 6 * P, 3 * P : 6 * P] = 1
    mask[8 * P : 10 * P, 4 * P : 7 * P] = 3
    video = [torch.roll(image, (t * step * P, t * step * P), dims=(1, 2)) for t in range(frames)]
    return video, mask


def test_the_mask_follows_an_object_whose_features_follow_it_exactly(shuffle_model):
    """Frames rolled by one patch a frame (inside the window): each predicted mask is the first frame's
    rendering rolled by as much, J = F = 1. The rendering (DINO's bilinear upsampling of patch labels)
    differs from the mask at each square corner pixel only."""
    video, mask = rolled_video(frames=5, step=1)
    features = (torch.from_numpy(patch_features(shuffle_model, [frame])[0]) for frame in video)
    masks = list(track(features, mask, patch_size=P, size_mask_neighborhood=2))
    values = [0, 1, 3]
    rendered = labels_to_mask(one_hot_at_grid(mask, values, (GRID, GRID)), values, P, mask.shape)
    assert (rendered != mask).sum() == 8  # 4 corners x 2 squares
    assert masks[0] is mask
    for t, predicted in enumerate(masks[1:], start=1):
        assert np.array_equal(predicted, np.roll(rendered, (t * P, t * P), axis=(0, 1))), t
    truths = [np.roll(rendered, (t * P, t * P), axis=(0, 1)) for t in range(5)]
    scores = video_jf([frame_jf(p, g, [1, 3]) for p, g in zip(masks, truths, strict=True)], [1, 3])
    assert (scores["J_mean"], scores["F_mean"], scores["J&F_mean"], scores["frames_scored"]) == (1, 1, 1, 3)


def test_motion_beyond_the_window_loses_the_object(shuffle_model):
    """Three patches a frame with a window of 1: the object's patches find no match of their own, and
    the mask no longer follows it."""
    video, mask = rolled_video(frames=2, step=3)
    features = (torch.from_numpy(patch_features(shuffle_model, [frame])[0]) for frame in video)
    predicted = list(track(features, mask, patch_size=P, size_mask_neighborhood=1))[1]
    assert jaccard(np.roll(mask, (3 * P, 3 * P), axis=(0, 1)) == 1, predicted == 1) < 0.5


def test_the_first_masks_void_is_background_never_an_object(shuffle_model):
    """DAVIS marks unlabelled pixels 255 (void); davis2017-evaluation reads them as background. A void
    block in the first mask is tracked as background: 255 is no object, never predicted, and the
    masks are those of the first mask with its void made background."""
    video, mask = rolled_video(frames=3, step=1)
    void = mask.copy()
    void[12 * P : 14 * P, 10 * P : 13 * P] = 255
    assert tracking.object_values(void) == [1, 3]

    def masks_of(first: np.ndarray) -> list[np.ndarray]:
        features = (torch.from_numpy(patch_features(shuffle_model, [frame])[0]) for frame in video)
        return list(track(features, first, patch_size=P, size_mask_neighborhood=2))

    with_void, without = masks_of(void), masks_of(mask)
    assert with_void[0] is void
    for predicted, expected in zip(with_void[1:], without[1:], strict=True):
        assert not (predicted == 255).any()
        assert np.array_equal(predicted, expected)


def test_jaccard_and_boundary_by_hand():
    truth = np.zeros((4, 4), dtype=bool)
    truth[0:2, 0:2] = True
    pred = np.zeros((4, 4), dtype=bool)
    pred[0:2, 1:3] = True
    assert jaccard(truth, pred) == pytest.approx(2 / 6)
    assert jaccard(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0  # both empty: 1 (DAVIS)
    block = np.zeros((5, 5), dtype=bool)
    block[1:3, 1:3] = True
    ring = np.ones((3, 3), dtype=bool)
    ring[1, 1] = False
    expected = np.zeros((5, 5), dtype=bool)
    expected[0:3, 0:3] = ring  # the boundary lies half a pixel towards the origin
    assert np.array_equal(boundary_map(block), expected)
    # 20 x 20: tolerance ceil(0.008 x 28.3) = 1 px (a plus). Squares 5 px wide, 3 px apart: of the 20
    # boundary pixels of each, 10 lie within 1 px of the other's (4 of the near side, 3 + 3 of top and
    # bottom), so precision = recall = F = 0.5
    truth = np.zeros((20, 20), dtype=bool)
    truth[5:10, 5:10] = True
    pred = np.roll(truth, 3, axis=1)
    assert boundary_f(truth, pred) == pytest.approx(0.5)
    assert boundary_f(truth, truth) == 1.0
    assert boundary_f(truth, np.zeros_like(truth)) == 0.0  # no predicted boundary: P = 1, R = 0
    assert boundary_f(np.zeros_like(truth), np.zeros_like(truth)) == 1.0


def test_video_scores_leave_out_the_first_and_last_frames_and_average_objects():
    truth = np.zeros((20, 20), dtype=np.uint8)
    truth[5:10, 5:10] = 1
    truth[12:16, 12:16] = 2
    wrong = np.zeros_like(truth)  # the first and last frames: nothing found, yet not scored
    half = truth.copy()
    half[5:10, 5:10] = np.where(np.arange(5) < 2, 0, 1)[None]  # object 1: 15 of its 25 pixels, J = 0.6
    frames = [frame_jf(p, truth, [1, 2]) for p in (wrong, truth, half, wrong)]
    scores = video_jf(frames, [1, 2])
    assert scores["frames_scored"] == 2
    assert scores["objects"]["1"]["J"] == pytest.approx((1 + 0.6) / 2) and scores["objects"]["2"]["J"] == 1
    assert scores["J_mean"] == pytest.approx(((1 + 0.6) / 2 + 1) / 2)
    assert scores["J&F_mean"] == pytest.approx((scores["J_mean"] + scores["F_mean"]) / 2)
    perfect = video_jf([None, *(frame_jf(truth, truth, [1, 2]) for _ in range(3)), None], [1, 2])
    assert (perfect["J_mean"], perfect["F_mean"], perfect["J&F_mean"]) == (1, 1, 1)
    truth_void = np.where(truth == 2, 255, truth)  # DAVIS reads the truth's void (255) as background
    assert frame_jf(truth, truth_void, [2]) == ([0.0], [0.0])


@pytest.fixture()
def video_files(tmp_path, shuffle_model):
    """frames/f8.png .. f11.png (natural order: f10 after f9), a palette first mask (objects 1 and 3,
    its own colours), the model file, and ground truth: the first mask's rendering rolled."""
    _, mask = rolled_video(frames=1, step=1)
    noise = np.random.default_rng(1).integers(0, 256, (GRID * P, GRID * P, 3), dtype=np.uint8)
    (tmp_path / "frames").mkdir()
    names = [f"f{8 + t}" for t in range(4)]
    for t, name in enumerate(names):
        Image.fromarray(np.roll(noise, (t * P, t * P), axis=(0, 1))).save(tmp_path / "frames" / f"{name}.png")
    colours = [0, 0, 0, 250, 10, 10, 0, 0, 0, 10, 250, 10] + [7] * (768 - 12)
    first = Image.fromarray(mask)
    first.putpalette(colours)
    first.save(tmp_path / "first.png")
    rendered = labels_to_mask(one_hot_at_grid(mask, [0, 1, 3], (GRID, GRID)), [0, 1, 3], P, mask.shape)
    (tmp_path / "truth").mkdir()
    for t, name in enumerate(names):
        Image.fromarray(np.roll(rendered, (t * P, t * P), axis=(0, 1))).save(tmp_path / "truth" / f"{name}.png")
    weights = dinokit.export_model(shuffle_model, tmp_path / "m.safetensors")
    args = [f"model={weights}", f"frames={tmp_path / 'frames'}", f"first_mask={tmp_path / 'first.png'}"]
    args += [f"out={tmp_path / 'out'}", "image_size=64", "size_mask_neighborhood=2", "device=cpu"]
    return tmp_path, args, names, colours, rendered


def test_track_command_writes_masks_overlays_and_scores(video_files, capsys):
    root, args, names, colours, rendered = video_files
    assert main(["track", *args, f"ground_truth={root / 'truth'}"]) == 0
    report = json.loads((root / "out" / "track.json").read_text())
    assert report["complete"] and report["frames"] == names and report["objects"] == [1, 3]
    assert report["settings"] == {
        "image_size": 64,
        "resize_policy": "aspect",
        "n_last_frames": 7,
        "size_mask_neighborhood": 2,
        "topk": 5,
    }
    scores = report["scores"]
    assert (scores["J_mean"], scores["F_mean"], scores["J&F_mean"], scores["frames_scored"]) == (1, 1, 1, 2)
    assert set(scores["objects"]) == {"1", "3"}
    for t, name in enumerate(names):
        written = Image.open(root / "out" / f"{name}.png")
        assert written.mode == "P" and written.size == (64, 64) and written.getpalette()[:12] == colours[:12]
        if t > 0:  # the first frame's mask is the given one
            assert np.array_equal(np.asarray(written), np.roll(rendered, (t * P, t * P), axis=(0, 1)))
        overlay = Image.open(root / "out" / "overlays" / f"{name}.png")
        assert overlay.size == (64, 64) and overlay.mode == "RGB"
    assert sorted(p.name for p in (root / "out").iterdir()) == sorted(
        [*(f"{n}.png" for n in names), "overlays", "track.json"]
    )


def test_track_command_refuses_bad_input_before_writing(video_files, capsys):
    root, args, names, _, _ = video_files

    def error(*changed: str) -> str:
        keys = {a.split("=")[0] for a in changed}
        assert main(["track", *(a for a in args if a.split("=")[0] not in keys), *changed]) == 2
        assert not (root / "out").exists()
        return capsys.readouterr().err

    (root / "empty").mkdir()
    assert "no images found" in error(f"frames={root / 'empty'}")
    Image.fromarray(np.ones((32, 64), dtype=np.uint8)).save(root / "small.png")
    assert "save the mask at its frame's size" in error(f"first_mask={root / 'small.png'}")
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(root / "none.png")
    assert "marks no object" in error(f"first_mask={root / 'none.png'}")
    (root / "odd").mkdir()
    for name in ("a.png", "b.png"):
        Image.open(root / "frames" / f"{names[0]}.png").crop((0, 0, 64, 60 if name == "b.png" else 64)).save(
            root / "odd" / name
        )
    assert "a video's frames share one size" in error(f"frames={root / 'odd'}")
    Image.open(root / "truth" / f"{names[2]}.png").resize((32, 32)).save(root / "truth" / f"{names[2]}.png")
    assert "is 32x32 pixels but the frames are 64x64" in error(f"ground_truth={root / 'truth'}")
    (root / "truth" / f"{names[1]}.png").unlink()
    assert f"lacks 1 of the frames' masks ({names[1]}.png)" in error(f"ground_truth={root / 'truth'}")


def test_an_object_smaller_than_the_patch_grid_is_named(video_files, capsys):
    """A 1-pixel object that the first frame's patches do not hold (PIL's nearest samples each patch's
    centre) is reported, and tracked as nothing."""
    root, args, names, colours, _ = video_files
    mask = np.asarray(Image.open(root / "first.png")).copy()
    mask[1, 1] = 5
    first = Image.fromarray(mask)
    first.putpalette(colours)
    first.save(root / "first.png")
    assert main(["track", *args]) == 0
    assert "object(s) [5] of the first mask cover no patch of the 16x16 patch grid" in capsys.readouterr().out
    report = json.loads((root / "out" / "track.json").read_text())
    assert report["objects"] == [1, 3, 5] and report["objects_below_the_patch_grid"] == [5]
    assert report["patch_grid"] == [16, 16] and "scores" not in report
    assert not (np.asarray(Image.open(root / "out" / f"{names[1]}.png")) == 5).any()
