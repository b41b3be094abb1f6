import json

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
import dinokit.maps.commands
from dinokit.cli import main
from dinokit.errors import DinokitError
from dinokit.maps.commands import DRAWN_SIDE, joint_heat_overlays, model_input
from dinokit.maps.matching import best_match_similarity, cosine_matrix, match_patches
from dinokit.maps.pca import patch_features, pca_rgb
from dinokit.maps.render import colorize, matches_figure, overlay
from dinokit.maps.similarity import patch_to_pixel, pixel_to_patch
from tests.conftest import perturb_scales_and_norms


def directions(degrees, shape, norms=1.0):
    """(h, w, 3) features: unit vectors at the given angles in the first two axes, times `norms`."""
    t = np.radians(np.asarray(degrees, dtype=np.float64))
    v = np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], axis=-1) * np.reshape(norms, (-1, 1))
    return v.reshape(*shape, 3)


def cosd(degrees):
    return np.cos(np.radians(degrees))


# A 2x2: a0..a3 at 0, 42, 90, 20 degrees; B 2x3: b0..b5 at 5, 350, 45, 100, 60, 270 degrees.
# A -> B nearest: a0 -> b0 (5 deg), a1 -> b2 (3), a2 -> b3 (10), a3 -> b0 (15).
# B -> A nearest: b0 -> a0, b2 -> a1, b3 -> a2 (b1 -> a0, b4 -> a1, b5 -> a0): a3's pair is not mutual.
A = directions([0, 42, 90, 20], (2, 2), norms=[1.0, 2.0, 0.5, 3.0])  # norms: cosine, not dot product
B = directions([5, 350, 45, 100, 60, 270], (2, 3), norms=[0.7, 1.0, 4.0, 1.0, 1.0, 2.0])


def as_lists(m):
    return m["a"].tolist(), m["b"].tolist()


def test_mutual_nearest_neighbours_by_hand():
    m = match_patches(A, B)
    assert as_lists(m) == ([[0, 1], [0, 0], [1, 0]], [[0, 2], [0, 0], [1, 0]])  # a1-b2, a0-b0, a2-b3
    assert np.allclose(m["similarity"], cosd([3, 5, 10]), atol=1e-12)
    every = match_patches(A, B, mutual=False)  # each A patch's nearest, a3 -> b0 too
    assert as_lists(every) == ([[0, 1], [0, 0], [1, 0], [1, 1]], [[0, 2], [0, 0], [1, 0], [0, 0]])
    assert np.allclose(every["similarity"], cosd([3, 5, 10, 15]), atol=1e-12)


def test_best_match_maps_by_hand():
    map_a, map_b = best_match_similarity(A, B)
    assert np.allclose(map_a, cosd([[5, 3], [10, 15]]), atol=1e-12)
    assert np.allclose(map_b, cosd([[5, 10, 3], [10, 18, 90]]), atol=1e-12)


def test_similarity_floor_ratio_test_and_foreground_remove_what_they_must():
    kept = match_patches(A, B, min_similarity=cosd(7))
    assert as_lists(kept) == ([[0, 1], [0, 0]], [[0, 2], [0, 0]])
    # distances d = 2 sin(angle / 2); best / second best: a1 3 vs 18 deg (0.168), a2 10 vs 30 (0.337),
    # a0 5 vs 10 (0.500)
    assert as_lists(match_patches(A, B, ratio=0.4)) == ([[0, 1], [1, 0]], [[0, 2], [1, 0]])
    assert as_lists(match_patches(A, B, ratio=0.3)) == ([[0, 1]], [[0, 2]])
    assert len(match_patches(A, B, ratio=0.51)["similarity"]) == 3
    # a0 outside the foreground: b0's nearest in A is now a3, so a3-b0 becomes a mutual pair
    fg_a = np.array([[False, True], [True, True]])
    m = match_patches(A, B, foreground=(fg_a, np.ones((2, 3), dtype=bool)))
    assert as_lists(m) == ([[0, 1], [1, 0], [1, 1]], [[0, 2], [1, 0], [0, 0]])
    assert np.allclose(m["similarity"], cosd([3, 10, 15]), atol=1e-12)
    empty = match_patches(A, B, foreground=(np.zeros((2, 2), dtype=bool), np.ones((2, 3), dtype=bool)))
    assert empty["a"].shape == (0, 2) and empty["similarity"].shape == (0,)


def test_max_matches_keeps_the_strongest_spread_out():
    assert as_lists(match_patches(A, B, max_matches=1)) == ([[0, 1]], [[0, 2]])
    # on 2x2 every patch touches a1, so the spread pass keeps one and the strongest others fill up
    assert as_lists(match_patches(A, B, max_matches=2)) == ([[0, 1], [0, 0]], [[0, 2], [0, 0]])
    assert len(match_patches(A, B, max_matches=10)["similarity"]) == 3
    assert as_lists(match_patches(A, B, max_matches=2.0)) == as_lists(match_patches(A, B, max_matches=2))  # YAML 2.0
    # a 1x6 strip matched to itself with similarity falling along it: the spread pass skips each
    # strongest match's neighbour (0, 2, 4), then the strongest skipped one (1) fills up
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1, 6, 64))
    b = a + np.arange(6)[None, :, None] * 0.05 * rng.normal(size=(1, 6, 64))
    m = match_patches(a, b)
    assert m["a"][:, 1].tolist() == [0, 1, 2, 3, 4, 5] and np.all(np.diff(m["similarity"]) < 0)
    assert match_patches(a, b, max_matches=3)["a"][:, 1].tolist() == [0, 2, 4]
    assert match_patches(a, b, max_matches=4)["a"][:, 1].tolist() == [0, 1, 2, 4]
    # B's patches shuffled (A's k-th strongest at B's column perm[k]): neighbours in B block too, both ways
    perm = [0, 2, 4, 1, 3, 5]
    shuffled = np.empty_like(b)
    shuffled[:, perm] = b
    m = match_patches(a, shuffled, max_matches=3)  # A 0-B 0, A 2-B 4; A 4-B 3 touches B 4: fill with A 1-B 2
    assert m["a"][:, 1].tolist() == [0, 1, 2] and m["b"][:, 1].tolist() == [0, 2, 4]
    m = match_patches(shuffled, a, max_matches=3)
    assert m["a"][:, 1].tolist() == [0, 2, 4] and m["b"][:, 1].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_matches": 0}, "max_matches must be a whole number >= 1"),
        ({"max_matches": 2.5}, "max_matches must be a whole number >= 1"),
        ({"min_similarity": 50}, "min_similarity must be a cosine between -1 and 1"),
        ({"ratio": 1.5}, "ratio (Lowe's test"),
    ],
)
def test_options_out_of_range_are_clear_errors(options, message):
    with pytest.raises(DinokitError, match=message.replace("(", r"\(")):
        match_patches(A, B, **options)


def test_patch_to_pixel_is_the_centre_of_the_patch_pixel_to_patch_finds():
    rows, cols = np.meshgrid(np.arange(5), np.arange(7), indexing="ij")
    x, y = patch_to_pixel(rows, cols, (100, 140), (5, 7))
    assert (x[0, 0], y[0, 0]) == (10.0, 10.0) and (x[4, 6], y[4, 6]) == (130.0, 90.0)
    for r, c, px, py in zip(rows.ravel(), cols.ravel(), x.ravel(), y.ravel(), strict=True):
        assert pixel_to_patch(px, py, (100, 140), (5, 7)) == (r, c)


def position_free_model(registers: int):
    """A ViT whose position embedding is zero: permutation-equivariant over the patch tokens."""
    torch.manual_seed(registers)
    model = perturb_scales_and_norms(dinokit.create_model("vit_micro_p4", depth=2, num_register_tokens=registers))
    with torch.no_grad():
        model.pos_embed.zero_()
    return model.eval()


def mirrored_patch_noise(seed: int, height: int = 16, width: int = 24, patch: int = 4) -> torch.Tensor:
    """(3, H, W) noise whose every patch is left-right symmetric, so that flipping the image only
    reverses the order of the patches in each row (their pixels stay as they were)."""
    x = torch.rand(3, height, width // patch, patch, generator=torch.Generator().manual_seed(seed))
    x[..., patch // 2 :] = x[..., : patch // 2].flip(-1)
    return x.reshape(3, height, width)


@pytest.mark.parametrize("registers", [0, 2])
def test_without_position_embedding_flips_and_rolls_match_their_patches(registers):
    model = position_free_model(registers)
    x = mirrored_patch_noise(registers)
    flipped = x.flip(-1)
    assert torch.equal(flipped.reshape(3, 16, 6, 4), x.reshape(3, 16, 6, 4).flip(2))  # patches reversed
    rolled = torch.roll(x, shifts=(4, 8), dims=(1, 2))  # one patch down, two right, wrapping round
    fa, ff, fr = patch_features(model, [x, flipped, rolled])
    assert np.allclose(ff, fa[:, ::-1], atol=1e-5) and np.allclose(fr, np.roll(fa, (1, 2), axis=(0, 1)), atol=1e-5)
    rows, cols = np.meshgrid(np.arange(4), np.arange(6), indexing="ij")
    for other, expected in [(ff, np.stack([rows, 5 - cols], -1)), (fr, np.stack([(rows + 1) % 4, (cols + 2) % 6], -1))]:
        m = match_patches(fa, other)
        assert len(m["a"]) == 24  # every patch, to its moved self
        assert np.array_equal(m["b"], expected[m["a"][:, 0], m["a"][:, 1]])
        assert np.allclose(m["similarity"], 1.0, atol=1e-5)
        best_a, best_b = best_match_similarity(fa, other)
        assert np.allclose(best_a, 1.0, atol=1e-5) and np.allclose(best_b, 1.0, atol=1e-5)
    s = fa.reshape(24, -1) / np.linalg.norm(fa.reshape(24, -1), axis=1, keepdims=True)
    assert (s @ s.T)[~np.eye(24, dtype=bool)].max() < 0.999  # the nearest neighbours are unique


def test_an_image_matches_itself_patch_for_patch():
    model = position_free_model(0)
    torch.manual_seed(1)
    model.pos_embed.data.normal_(std=0.5)  # with position embedding, as a trained model
    (f,) = patch_features(model, [torch.rand(3, 16, 24)])
    m = match_patches(f, f)
    assert len(m["a"]) == 24 and np.array_equal(m["a"], m["b"])
    assert np.allclose(m["similarity"], 1.0, atol=1e-6)
    assert all(np.allclose(best, 1.0, atol=1e-6) for best in best_match_similarity(f, f))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("matches")
    weights = dinokit.export_model(position_free_model(2), root / "m.safetensors")
    pixels = (mirrored_patch_noise(5).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(root / "a.png")  # 24x16: image_size=16 keeps it as it is
    Image.fromarray(pixels[:, ::-1]).save(root / "flipped.png")
    Image.fromarray(np.asarray(Image.fromarray(pixels).resize((60, 40)))).save(root / "big.png")
    return root, weights


def test_visualize_matches_command_writes_the_picture_and_the_matches_in_original_pixels(files, capsys):
    root, weights = files
    args = [f"model={weights}", "image_size=16", "device=cpu", f"image={root / 'a.png'}"]
    out, out_json = root / "m.png", root / "m.json"
    assert main(["visualize", "matches", *args, f"other={root / 'flipped.png'}", f"out={out}", f"json={out_json}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["matches"] == 24 and report["grid"] == [4, 6] and report["other_grid"] == [4, 6]
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > 300
    saved = json.loads(out_json.read_text())
    assert saved["image_width_height"] == [24, 16] and saved["other_width_height"] == [24, 16]
    assert len(saved["matches"]) == 24 == saved["candidates"]
    for pair in saved["matches"]:  # the flip: x -> 24 - x, patch centres at 2, 6, 10, ...
        (x, y), (ox, oy) = pair["image"], pair["other"]
        assert ox == 24 - x and oy == y and x % 4 == 2 and y % 4 == 2 and pair["similarity"] > 0.9999
        assert pair["other_patch"] == [pair["patch"][0], 5 - pair["patch"][1]]
    sims = [p["similarity"] for p in saved["matches"]]
    assert sims == sorted(sims, reverse=True)

    # another size than the model's input: centres in the original 60x40 pixels; the sparse mode
    assert main(["visualize", "matches", *args, f"other={root / 'big.png'}", f"out={out}", "max_matches=5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["matches"] == 5 and report["candidates"] >= 5 and report["json"] is None
    json_args = [f"json={out_json}", "max_matches=none", "min_similarity=0.5"]
    assert main(["visualize", "matches", *args, f"other={root / 'big.png'}", f"out={out}", *json_args]) == 0
    saved = json.loads(out_json.read_text())
    assert saved["other_width_height"] == [60, 40] and 0 < len(saved["matches"]) <= 24
    assert saved["settings"] == {
        "image_size": 16,
        "resize_policy": "aspect",
        "max_matches": None,
        "min_similarity": 0.5,
        "ratio": None,
        "foreground_threshold": None,
    }
    for pair in saved["matches"]:
        ox, oy = pair["other"]
        assert 0 <= ox < 60 and 0 <= oy < 40 and pair["similarity"] >= 0.5
        assert pixel_to_patch(ox, oy, (40, 60), (4, 6)) == tuple(pair["other_patch"])


def test_visualize_matches_foreground_threshold_matches_only_foreground_patches(files, capsys):
    root, weights = files
    pictures = [root / "a.png", root / "big.png"]
    args = [f"model={weights}", "image_size=16", "device=cpu", f"image={pictures[0]}", f"other={pictures[1]}"]
    out = [f"out={root / 'fg.png'}", f"json={root / 'fg.json'}", "max_matches=none"]
    assert main(["visualize", "matches", *args, *out, "foreground_threshold=0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = dinokit.load_model(weights)
    feats = patch_features(model, [model_input(model, p, 16) for p in pictures])
    fg_a, fg_b = pca_rgb(feats, 0.5)["foreground"]
    assert 0 < fg_a.sum() < 24 and 0 < fg_b.sum() < 24  # the threshold splits both images
    expected = match_patches(*feats, foreground=(fg_a, fg_b))
    saved = json.loads((root / "fg.json").read_text())["matches"]
    assert report["matches"] == len(expected["a"]) == len(saved) > 0
    assert [p["patch"] for p in saved] == expected["a"].tolist()
    assert [p["other_patch"] for p in saved] == expected["b"].tolist()
    assert all(fg_a[tuple(p["patch"])] and fg_b[tuple(p["other_patch"])] for p in saved)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"other": "missing.png"}, "cannot read the image"),
        ({"image_size": "15"}, "image_size 15 is not a multiple of the patch size 4; use 12 or 16"),
        ({"max_matches": "0"}, "max_matches must be a whole number >= 1 (or none: every match)"),
        ({"foreground_threshold": "50"}, "foreground_threshold must be between 0 and 1"),
        ({"json": "matches.txt"}, "its name must end in .json"),
    ],
)
def test_visualize_matches_bad_input_is_a_clear_error(files, capsys, change, message):
    root, weights = files
    keys = {"model": weights, "image": root / "a.png", "other": root / "flipped.png", "out": root / "e.png"}
    keys |= {"image_size": "16", "device": "cpu"}
    keys |= {k: root / v if k in ("other", "json") else v for k, v in change.items()}
    assert main(["visualize", "matches", *[f"{k}={v}" for k, v in keys.items()]]) == 2
    assert message in capsys.readouterr().err
    assert not (root / "e.png").exists()


def test_visualize_matches_computes_the_similarity_matrix_once(files, capsys, monkeypatch):
    """The (h1*w1, h2*w2) matrix S is the large array of matching (8000 x 8000 float64 = 512 MB for two
    1024 px photos at patch 14); it was computed three times (candidates, matches, best-match maps)."""
    root, weights = files
    calls = []
    real = dinokit.maps.matching.cosine_matrix
    monkeypatch.setattr(dinokit.maps.commands, "cosine_matrix", lambda a, b: calls.append(1) or real(a, b))
    monkeypatch.setattr(dinokit.maps.matching, "cosine_matrix", lambda a, b: calls.append(1) or real(a, b))
    args = [f"model={weights}", "image_size=16", "device=cpu", f"image={root / 'a.png'}", f"other={root / 'big.png'}"]
    assert main(["visualize", "matches", *args, f"out={root / 'once.png'}", "max_matches=3", "ratio=0.99"]) == 0
    assert len(calls) == 1
    report = json.loads(capsys.readouterr().out)
    model = dinokit.load_model(weights)
    feats = patch_features(model, [model_input(model, root / name, 16) for name in ("a.png", "big.png")])
    assert report["candidates"] == len(match_patches(*feats, ratio=0.99)["similarity"]) > report["matches"] == 3


def test_a_given_similarity_matrix_gives_the_same_matches_and_maps():
    s = cosine_matrix(A, B)
    for options in [{}, {"ratio": 0.4}, {"max_matches": 2, "min_similarity": 0.9}]:
        given, computed = match_patches(A, B, similarity=s, **options), match_patches(A, B, **options)
        assert as_lists(given) == as_lists(computed) and given["candidates"] == computed["candidates"]
        assert np.array_equal(given["similarity"], computed["similarity"])
    assert match_patches(A, B)["candidates"] == 3 and match_patches(A, B, max_matches=1)["candidates"] == 3
    assert all(
        np.array_equal(g, c)
        for g, c in zip(best_match_similarity(A, B, similarity=s), best_match_similarity(A, B), strict=True)
    )
    with pytest.raises(DinokitError, match=r"similarity must be cosine_matrix\(a, b\), 4 x 6"):
        match_patches(A, B, similarity=s.T)


def test_best_match_maps_share_one_colour_scale(files, capsys, monkeypatch):
    """Each best-match map was coloured from its own min..max with no colour bar, so one colour was
    another cosine in each image (and cosines 0.9998..1.0 of an image matched with itself spanned the
    whole colour map); both maps now share one scale, shown by a colour bar."""
    grey = [np.full((4, 8, 3), 128, dtype=np.uint8)] * 2
    (left, right), scale = joint_heat_overlays(grey, [np.array([[0.3, 0.5]]), np.array([[0.5, 0.9]])])
    assert scale == (0.3, 0.9)
    assert np.array_equal(left[:, -1], right[:, 0])  # 0.5 at A's right edge and at B's left edge: one colour
    assert not np.array_equal(left[:, 0], right[:, -1])  # 0.3 and 0.9
    (low, high), scale = joint_heat_overlays(grey, [np.full((1, 2), 0.9999995), np.full((1, 2), 1.0)])
    assert np.allclose(scale, (0.99499975, 1.00499975))  # as the colour bar: at least 0.01 wide
    middle = overlay(grey[0], colorize(np.full((4, 8), 0.5), vmin=0, vmax=1))[0, 0].astype(int)
    assert all(np.abs(m[0, 0].astype(int) - middle).max() <= 8 for m in (low, high))  # not black and yellow
    root, weights = files
    drawn = {}
    real = dinokit.maps.commands.matches_figure
    monkeypatch.setattr(dinokit.maps.commands, "matches_figure", lambda *a: drawn.update(args=a) or real(*a))
    args = [f"model={weights}", "image_size=16", "device=cpu", f"image={root / 'a.png'}", f"other={root / 'big.png'}"]
    assert main(["visualize", "matches", *args, f"out={root / 'scale.png'}"]) == 0
    model = dinokit.load_model(weights)
    feats = patch_features(model, [model_input(model, root / name, 16) for name in ("a.png", "big.png")])
    best = best_match_similarity(*feats)
    lo, hi, label = drawn["args"][5]
    assert (lo, hi) == (min(m.min() for m in best), max(m.max() for m in best)) and "both images" in label


def test_large_photos_are_drawn_at_the_figure_size_with_the_lines_on_their_patches(files, capsys, monkeypatch):
    """Two 24 MP photos were drawn whole (heat maps upsampled to 6000x4000 for an 800 px figure: 4 GB,
    22 s); they are drawn at most DRAWN_SIDE px, the line ends scaled with them, the JSON unchanged."""
    root, weights = files
    Image.fromarray(np.zeros((2000, 3200, 3), dtype=np.uint8)).save(root / "huge.png")
    drawn = {}
    real = dinokit.maps.commands.matches_figure
    monkeypatch.setattr(dinokit.maps.commands, "matches_figure", lambda *a: drawn.update(args=a) or real(*a))
    args = [f"model={weights}", "image_size=16", "device=cpu", f"image={root / 'a.png'}", f"other={root / 'huge.png'}"]
    assert main(["visualize", "matches", *args, f"out={root / 'huge_m.png'}", f"json={root / 'huge.json'}"]) == 0
    (small, shown), (xy_small, xy_shown), *_ = drawn["args"]
    assert small.shape == (16, 24, 3) and shown.shape == (DRAWN_SIDE * 5 // 8, DRAWN_SIDE, 3)
    saved = json.loads((root / "huge.json").read_text())
    assert saved["other_width_height"] == [3200, 2000] and len(saved["matches"]) == len(xy_shown) > 0
    original = np.array([p["other"] for p in saved["matches"]])
    assert np.allclose(xy_shown, original * DRAWN_SIDE / 3200, atol=0.01)
    assert np.allclose(xy_small, [p["image"] for p in saved["matches"]], atol=0.01)  # small: as it is


def test_the_colour_bar_of_one_match_is_readable():
    """One match (or cosines 1e-6 apart) gave a colour bar of lo..lo + 1e-6 labelled as an offset
    ('1e-6+5.2558e-1') plus ticks 1.2 .. 2.0; the bar now spans at least 0.01 about the values, in
    plain numbers."""
    rgb = np.zeros((8, 12, 3), dtype=np.uint8)
    points = (np.array([[2.0, 2.0]]), np.array([[6.0, 6.0]]))
    below = [("a", rgb), ("b", rgb)]
    fig = matches_figure((rgb, rgb), points, np.array([0.5255811]), below, "t", (0.3, 0.3 + 1e-7, "best"))
    fig.canvas.draw()
    bars = [ax for ax in fig.axes if ax.get_ylabel() in ("cosine similarity", "best")]
    assert len(bars) == 2
    for bar, value in zip(bars, [0.5255811, 0.3], strict=True):
        lo, hi = bar.get_ylim()
        assert np.isclose(hi - lo, 0.01) and np.isclose((lo + hi) / 2, value + (5e-8 if value == 0.3 else 0))
        assert bar.yaxis.get_major_formatter().get_offset() == ""
        assert all(
            lo - 2e-3 <= float(t.get_text().replace("\u2212", "-")) <= hi + 2e-3
            for t in bar.get_yticklabels()
            if t.get_text()
        )


def test_the_title_counts_one_match_in_the_singular(files, monkeypatch):
    """The title read '1 mutual nearest-neighbour patch matches'."""
    root, weights = files
    drawn = {}
    real = dinokit.maps.commands.matches_figure
    monkeypatch.setattr(dinokit.maps.commands, "matches_figure", lambda *a: drawn.update(args=a) or real(*a))
    args = [f"model={weights}", "image_size=16", "device=cpu", f"image={root / 'a.png'}", f"other={root / 'a.png'}"]
    assert main(["visualize", "matches", *args, f"out={root / 'one.png'}", "max_matches=1"]) == 0
    assert ": 1 of 24 mutual nearest-neighbour patch matches" in drawn["args"][4]
    monkeypatch.setattr(
        dinokit.maps.commands, "match_patches", lambda *a, **k: match_patches(*a, **k) | {"candidates": 1}
    )
    assert main(["visualize", "matches", *args, f"out={root / 'one.png'}", "max_matches=1"]) == 0
    assert drawn["args"][4].endswith(": 1 mutual nearest-neighbour patch match")
