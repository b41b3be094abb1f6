import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from skimage.filters import threshold_otsu

import dinokit
from dinokit.cli import main
from dinokit.data.images import open_rgb
from dinokit.errors import DinokitError
from dinokit.maps.attention import attention_maps, attention_mass_masks
from dinokit.maps.commands import DRAWN_SIDE, output_names, read_mask, segment
from dinokit.maps.pca import pca_rgb
from dinokit.maps.segment import otsu_threshold, patch_coverage, segment_features, similarity_to
from dinokit.maps.similarity import patch_similarity, pixel_to_patch
from dinokit.models.vision_transformer import VisionTransformer, ViTConfig
from tests.conftest import perturb_scales_and_norms, run_example


@pytest.fixture(scope="module")
def reg_model():
    torch.manual_seed(0)
    return perturb_scales_and_norms(dinokit.create_model("vit_micro_p4", depth=2, num_register_tokens=2)).eval()


def test_attention_rows_sum_to_one_and_registers_are_kept_out_of_the_maps(reg_model):
    x = torch.randn(3, 16, 24)
    maps = attention_maps(reg_model, x)
    assert maps["per_head"].shape == (3, 4, 6) and maps["mean"].shape == (4, 6)
    total = maps["per_head"].sum(axis=(1, 2)) + maps["cls_to_cls"] + maps["cls_to_registers"].sum(axis=1)
    assert np.allclose(total, 1.0, atol=1e-5)
    with torch.no_grad():
        attn = reg_model.get_last_selfattention(x[None])[0]  # (heads, 1 + 2 + 24, same)
    assert np.allclose(maps["per_head"].reshape(3, -1), attn[:, 0, 3:].numpy())  # patches only
    assert np.allclose(maps["cls_to_registers"], attn[:, 0, 1:3].numpy())
    assert np.allclose(maps["registers_to_patches"].reshape(2, -1), attn[:, 1:3, 3:].mean(0).numpy())
    assert np.allclose(maps["mean"], maps["per_head"].mean(0))


def test_mass_masks_hold_the_mass_with_the_fewest_patches():
    row = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    assert attention_mass_masks(row, 0.6).tolist() == [[True, False, True, False]]  # 0.8 >= 0.6; 0.5 alone < 0.6
    assert attention_mass_masks(row, 0.5).tolist() == [[True, False, False, False]]
    attn = torch.rand(5, 50) ** 3
    masks = attention_mass_masks(attn, 0.6)
    share = attn / attn.sum(1, keepdim=True)
    for head in range(5):
        kept = share[head][masks[head]]
        assert kept.sum() >= 0.6 - 1e-6 and kept.sum() - kept.min() < 0.6  # enough, and no patch to spare
        assert kept.min() >= share[head][~masks[head]].max()  # the largest ones


def constructed(shape, rng, scales=(3.0, 2.0, 1.0), dim=16):
    """Patch features along three known directions with variances scales**2, plus tiny noise."""
    coeffs = rng.normal(size=(*shape, 3)) * np.array(scales)
    return coeffs @ np.eye(dim)[:3] + 0.01 * rng.normal(size=(*shape, dim))


def test_pca_components_are_orthonormal_ordered_and_shared_across_images():
    rng = np.random.default_rng(0)
    a, b = constructed((16, 16), rng), constructed((12, 18), rng)
    b[2, 3] = a[1, 1]  # the same feature in both images
    out = pca_rgb([a, b])
    comps = out["components"]
    assert np.allclose(comps @ comps.T, np.eye(3), atol=1e-8)
    assert np.allclose(np.abs(comps[:, :3]), np.eye(3), atol=0.05)  # recovers the directions, in order
    ratios = out["explained_variance_ratio"]
    assert ratios[0] > ratios[1] > ratios[2] and abs(ratios[0] / ratios[1] - 9 / 4) < 0.5
    coords = np.concatenate([a.reshape(-1, 16), b.reshape(-1, 16)]) @ comps.T
    cov = np.cov(coords.T)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-8  # uncorrelated colour channels
    assert out["rgb"][0].shape == (16, 16, 3) and out["rgb"][1].shape == (12, 18, 3)
    assert np.array_equal(out["rgb"][1][2, 3], out["rgb"][0][1, 1])
    assert out["rgb"][0].min() >= 0 and max(r.max() for r in out["rgb"]) == 1.0


def test_pca_foreground_is_the_first_component_above_the_threshold():
    rng = np.random.default_rng(1)
    images, truths = [], []
    for h, w in ((8, 8), (8, 10)):
        fg = np.zeros((h, w), dtype=bool)
        fg[2:6, 3:7] = True
        feats = constructed((h, w), rng, scales=(0.5, 0.3, 0.2))
        feats[..., 5] += np.where(fg, 4.0, -4.0)  # object vs background along a 4th direction
        images.append(feats)
        truths.append(fg)
    out = pca_rgb(images, foreground_threshold=0.5)
    for got, truth, rgb in zip(out["foreground"], truths, out["rgb"], strict=True):
        assert np.array_equal(got, truth)  # oriented so that the border is background
        assert np.all(rgb[~truth] == 0)
    assert abs(out["components"][0, 5]) < 0.1  # colours come from the foreground's own variation


def test_pixel_to_patch_and_patch_similarity():
    assert pixel_to_patch(0, 0, (100, 200), (5, 10)) == (0, 0)
    assert pixel_to_patch(199, 99, (100, 200), (5, 10)) == (4, 9)
    assert pixel_to_patch(45, 21, (100, 200), (5, 10)) == (1, 2)
    with pytest.raises(ValueError, match="outside"):
        pixel_to_patch(200, 5, (100, 200), (5, 10))
    feats = np.random.default_rng(2).normal(size=(4, 6, 8))
    cos = patch_similarity(feats, (2, 5))
    assert cos[2, 5] == pytest.approx(1.0) and np.unravel_index(cos.argmax(), cos.shape) == (2, 5)
    assert cos.max() <= 1 + 1e-9 and cos.min() >= -1 - 1e-9
    other = feats[::-1].copy()
    assert np.unravel_index(patch_similarity(feats, (2, 5), other).argmax(), (4, 6)) == (1, 5)


def test_otsu_splits_a_bimodal_array_between_its_modes():
    rng = np.random.default_rng(3)
    low, high = 0.2 + 0.02 * rng.random(300), 0.7 + 0.02 * rng.random(100)
    t = otsu_threshold(np.concatenate([low, high]))
    assert low.max() < t < high.min()
    assert otsu_threshold(np.full(5, 0.3)) == 0.3
    assert otsu_threshold(np.array([0.0, 0.0, 0.0, 1.0, 1.0])) == 0.5

    def between_class_variance(v, t):
        w0 = np.mean(v <= t)
        return w0 * (1 - w0) * (v[v <= t].mean() - v[v > t].mean()) ** 2

    for seed in range(3):  # overlapping modes: the optimum of a brute-force search, and >= scikit-image's
        r = np.random.default_rng(seed)
        values = np.concatenate([r.normal(0.3, 0.05, 300), r.normal(0.6, 0.08, 200)])
        best = max(between_class_variance(values, t) for t in np.sort(values)[:-1])
        ours = between_class_variance(values, otsu_threshold(values))
        assert ours == pytest.approx(best, rel=1e-12)
        assert ours >= between_class_variance(values, threshold_otsu(values))


def test_segmentation_finds_the_constructed_object():
    rng = np.random.default_rng(4)
    obj, background = rng.normal(size=32), rng.normal(size=32)

    def scene(rows, cols):
        truth = np.zeros((8, 8), dtype=bool)
        truth[rows, cols] = True
        feats = np.where(truth[..., None], obj, background) + 0.05 * rng.normal(size=(8, 8, 32))
        return feats, np.kron(truth, np.ones((4, 4), dtype=bool))  # 4-pixel patches

    ref_feats, ref_mask = scene(slice(2, 6), slice(2, 6))
    assert np.array_equal(patch_coverage(ref_mask, (8, 8)) == 1.0, ref_mask[::4, ::4])
    target, truth = scene(slice(0, 3), slice(4, 8))
    for threshold in ("otsu", 0.5):
        seg = segment_features([(ref_feats, ref_mask)], target, (32, 32), threshold)
        assert np.array_equal(seg["mask"][2::4, 2::4], truth[2::4, 2::4])  # every patch centre right
        assert (seg["mask"] & truth).sum() / (seg["mask"] | truth).sum() > 0.8
    second, second_mask = scene(slice(0, 8), slice(0, 2))
    both = segment_features([(ref_feats, ref_mask), (second, second_mask)], target, (32, 32))
    one = similarity_to(target, ref_feats[ref_mask[::4, ::4]].mean(0))
    two = similarity_to(target, second[second_mask[::4, ::4]].mean(0))
    assert np.allclose(both["similarity"], (one + two) / 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory, reg_model):
    root = tmp_path_factory.mktemp("maps")
    weights = dinokit.export_model(reg_model, root / "m.safetensors")
    (root / "photos").mkdir()
    Image.fromarray(data.chelsea()).resize((60, 40)).save(root / "photos" / "chelsea.png")
    Image.fromarray(data.coffee()).resize((48, 36)).save(root / "photos" / "coffee.png")
    (root / "photos" / "broken.png").write_bytes(b"")  # skipped and reported, never fatal
    return root, weights


def test_visualize_commands_write_pngs(files, capsys):
    root, weights = files
    common = [f"model={weights}", "image_size=16", "device=cpu"]
    assert (
        main(["visualize", "attention", f"image={root / 'photos' / 'chelsea.png'}", f"out={root / 'a.png'}", *common])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["grid"] == [4, 6]
    assert report["cls_to_patches"] + report["cls_to_cls"] + sum(report["cls_to_registers"]) == pytest.approx(
        1, abs=1e-5
    )
    pca = [f"image={root / 'photos'}", f"out={root / 'p.png'}", "foreground_threshold=0.5", *common]
    assert main(["visualize", "pca", *pca]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in printed
    report = json.loads(printed[printed.index("{") :])
    assert report["images"] == 2 and report["skipped"] == [str(root / "photos" / "broken.png")]
    sim = [f"image={root / 'photos' / 'chelsea.png'}", "x=59", "y=0", f"out={root / 's.png'}", *common]
    assert main(["visualize", "similarity", *sim]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["patch"] == [0, 5] and report["best_match"] == [0, 5] and report["max"] == pytest.approx(1)
    for name in ("a.png", "p.png", "s.png"):
        assert Image.open(root / name).format == "PNG"
    assert main(["visualize", "similarity", *sim[:1], "x=60", "y=0", *sim[3:]]) == 2  # outside: clear error


def test_segment_command_on_a_pixel_identity_model(tmp_path):
    """Position embeddings zeroed and LayerScale tiny: a patch's feature is its own pixels, so the
    red square of the reference is found, and only it, in targets where it moved."""
    torch.manual_seed(0)
    model = dinokit.create_model("vit_micro_p4", depth=1)
    with torch.no_grad():
        model.pos_embed.zero_()
    weights = dinokit.export_model(model, tmp_path / "m.safetensors")
    rng = np.random.default_rng(5)
    texture = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)  # patch-wise texture

    def scene(top, left, name):
        image = texture.copy()
        image[top : top + 12, left : left + 12] = (230, 20, 20)
        truth = np.zeros((32, 32), dtype=bool)
        truth[top : top + 12, left : left + 12] = True
        Image.fromarray(image).save(tmp_path / name)
        return truth

    reference_truth = scene(8, 8, "ref.png")
    Image.fromarray(reference_truth.astype(np.uint8) * 255).save(tmp_path / "ref_mask.png")
    (tmp_path / "targets").mkdir()
    truths = {"t1": scene(0, 20, "targets/t1.png"), "t2": scene(16, 4, "targets/t2.png")}
    (tmp_path / "targets" / "t3_broken.png").write_bytes(b"\x89PNG")  # skipped and listed, never fatal
    args = [f"reference={tmp_path / 'ref.png'}", f"reference_mask={tmp_path / 'ref_mask.png'}"]
    args += [f"target={tmp_path / 'targets'}", f"out={tmp_path / 'seg'}", f"model={weights}", "image_size=32"]
    assert main(["segment", *args]) == 0
    report = json.loads((tmp_path / "seg" / "segment.json").read_text())
    assert report["skipped"] == [str(tmp_path / "targets" / "t3_broken.png")]
    assert [r["target"].endswith(f"{n}.png") for r, n in zip(report["results"], truths, strict=True)] == [True, True]
    for name, truth in truths.items():
        mask = np.asarray(Image.open(tmp_path / "seg" / f"{name}_mask.png")) > 127
        assert (mask & truth).sum() / (mask | truth).sum() > 0.8
        assert Image.open(tmp_path / "seg" / f"{name}_overlay.png").size == (32, 32)


def test_segment_keeps_apart_targets_that_share_a_name(tmp_path):
    """Targets listed recursively: a/cat.png, b/cat.png, cat.png and cat.jpg each get their own mask
    (of their own size; the second cat is cat_png) and segment.json names each result's files."""
    weights = dinokit.export_model(dinokit.create_model("vit_micro_p4", depth=1), tmp_path / "m.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    Image.fromarray(np.eye(16, dtype=np.uint8) * 255).save(tmp_path / "ref_mask.png")
    sizes = {"a/cat.png": (16, 20), "b/cat.png": (24, 16), "cat.png": (16, 28), "cat.jpg": (32, 16)}
    for name, (w, h) in sizes.items():
        (tmp_path / "targets" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "targets" / name)
    out = tmp_path / "seg"
    args = [tmp_path / "ref.png", tmp_path / "ref_mask.png", tmp_path / "targets"]
    result = segment(*map(str, args), out=str(out), model=weights, image_size=16, device="cpu")
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*_mask.png"))
    assert written == ["a/cat_mask.png", "b/cat_mask.png", "cat_mask.png", "cat_png_mask.png"]
    report = json.loads((out / "segment.json").read_text())
    assert report["results"] == result["results"]
    for entry in report["results"]:
        size = sizes[str(Path(entry["target"]).relative_to(tmp_path / "targets"))]
        assert Image.open(entry["mask"]).size == Image.open(entry["overlay"]).size == size


def test_output_names_of_a_list_file_are_distinct_and_relative(tmp_path):
    paths = [tmp_path / "lists" / ".." / "x" / "Cat.png", tmp_path / "y" / "cat.png", tmp_path / "x" / "cat.jpg"]
    names = output_names([*paths, paths[1]], tmp_path / "lists" / "targets.txt")  # the last one twice
    assert names == ["x/Cat", "y/cat", "x/cat_jpg", "y/cat_png"]
    assert output_names([tmp_path / "one.png"], tmp_path / "one.png") == ["one"]


def test_reference_masks_follow_exif_and_must_be_aligned_with_their_photo(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees clockwise
    Image.fromarray(np.zeros((30, 45, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg", exif=exif)
    raw = np.zeros((30, 45), dtype=np.uint8)
    raw[:, :15] = 255  # the left third of the stored pixels = the top third as displayed
    Image.fromarray(raw).save(tmp_path / "mask.png", exif=exif)
    size = open_rgb(tmp_path / "photo.jpg").size
    assert size == (30, 45)
    mask = read_mask(tmp_path / "mask.png", size)
    assert mask.shape == (45, 30) and mask[:15].all() and not mask[15:].any()

    Image.fromarray(raw[::3, ::3]).save(tmp_path / "small.png")  # 15 x 10, stored orientation: no tag
    with pytest.raises(DinokitError, match=r"15x10 pixels .* image is 30x45"):
        read_mask(tmp_path / "small.png", size)
    Image.fromarray(raw.T[::3, ::3]).save(tmp_path / "small.png")  # 10 x 15: same aspect, a third the size
    assert np.array_equal(read_mask(tmp_path / "small.png", size), mask)


def test_a_damaged_reference_mask_is_one_error_naming_it_and_a_damaged_exif_block_is_ignored(tmp_path):
    good = tmp_path / "exif.png"
    Image.fromarray(np.full((4, 6), 255, dtype=np.uint8)).save(good, exif=b"MX\x00*\x00\x00\x00\x08")
    assert read_mask(good, (6, 4)).all()  # Pillow's EXIF parser raised SyntaxError: a traceback
    (tmp_path / "mask.png").write_bytes(Image.open(good).tobytes()[:5])
    with pytest.raises(DinokitError, match=r"cannot read the reference mask .*mask\.png"):
        read_mask(tmp_path / "mask.png", (6, 4))  # was Pillow's message alone, naming no file


def test_example_script_draws_every_picture_on_the_photos(tmp_path, monkeypatch):
    """examples/feature_maps.py end to end, on a one-block 14 px-patch ViT (fast at any size)."""
    config = ViTConfig(img_size=56, patch_size=14, embed_dim=32, depth=1, num_heads=2, num_register_tokens=2)
    weights = dinokit.export_model(VisionTransformer(config), tmp_path / "tiny.safetensors")
    script = Path(__file__).parents[1] / "examples" / "feature_maps.py"
    out = tmp_path / "out"
    run_example(script, ["--model", weights, "--out", str(out), "--image-size", "56"], monkeypatch)
    pictures = ["attention_chelsea.png", "pca_joint.png", "similarity_eye.png", "similarity_eye_astronaut.png"]
    pictures.append("matches.png")
    for name in pictures:
        with Image.open(out / name) as image:
            image.verify()
    masks = sorted((out / "segment").rglob("*.png"))
    assert len(masks) >= 4, masks


@pytest.mark.parametrize("command", ["attention", "pca", "similarity"])
def test_a_size_off_the_patch_grid_names_the_nearest_sizes(files, capsys, command):
    root, weights = files
    extra = ["x=1", "y=1"] if command == "similarity" else []
    image = f"image={root / 'photos' / 'chelsea.png'}"
    assert (
        main(["visualize", command, f"model={weights}", image, "image_size=15", f"out={root / 'e.png'}", *extra]) == 2
    )
    assert "image_size 15 is not a multiple of the patch size 4; use 12 or 16" in capsys.readouterr().err
    assert not (root / "e.png").exists()


@pytest.mark.parametrize(
    ("command", "key", "message"),
    [
        ("attention", "mass=60", "mass must be a share between 0 and 1"),
        ("attention", "mass=0", "mass must be a share between 0 and 1"),
        ("pca", "foreground_threshold=50", "foreground_threshold must be between 0 and 1"),
    ],
)
def test_shares_outside_0_1_are_a_clear_error(tmp_path, capsys, command, key, message):
    """mass=60 (a percentage) drew every patch as the mass map, and foreground_threshold=50 left no
    foreground, so the picture silently fell back to all patches as foreground."""
    weights = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "m.safetensors")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    args = [f"model={weights}", f"image={tmp_path / 'cat.png'}", f"out={tmp_path / 'v.png'}", "image_size=16", key]
    assert main(["visualize", command, *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("threshold", ["50", "-2", "high"])
def test_segment_threshold_outside_the_cosine_range_is_a_clear_error(tmp_path, capsys, threshold):
    """threshold=50 (a percentage) gave an empty mask for every target, silently."""
    weights = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "m.safetensors")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(tmp_path / "mask.png")
    images = [f"reference={tmp_path / 'cat.png'}", f"reference_mask={tmp_path / 'mask.png'}", f"target={tmp_path}"]
    args = [f"model={weights}", *images, f"out={tmp_path / 'seg'}", "image_size=16", f"threshold={threshold}"]
    assert main(["segment", *args]) == 2
    assert "threshold must be a cosine between -1 and 1" in capsys.readouterr().err
    assert not (tmp_path / "seg").exists()


MAPS_COMMANDS = ["attention", "pca", "similarity", "matches", "segment", "track"]


def maps_command_args(command: str, root: Path, model: str) -> list[str]:
    """The CLI words of one maps command on 24x16 pictures (a 4x6 grid at image_size=16) under `root`."""
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    (root / "frames").mkdir(exist_ok=True)
    for name, picture in [("a.png", pixels), ("frames/f0.png", pixels), ("frames/f1.png", pixels[::-1])]:
        Image.fromarray(picture).save(root / name)
    mask = np.zeros((16, 24), dtype=np.uint8)
    mask[4:12, 8:16] = 1
    Image.fromarray(mask).save(root / "mask.png")
    common = [f"model={model}", "image_size=16", "device=cpu"]
    image, out = f"image={root / 'a.png'}", f"out={root / 'out.png'}"
    segment = ["segment", f"reference={root / 'a.png'}", f"reference_mask={root / 'mask.png'}"]
    return {
        "attention": ["visualize", "attention", image, out],
        "pca": ["visualize", "pca", image, out],
        "similarity": ["visualize", "similarity", image, "x=1", "y=1", out],
        "matches": ["visualize", "matches", image, f"other={root / 'frames' / 'f1.png'}", out],
        "segment": [*segment, f"target={root / 'frames'}", f"out={root / 'segment'}"],
        "track": ["track", f"frames={root / 'frames'}", f"first_mask={root / 'mask.png'}", f"out={root / 'track'}"],
    }[command] + common


@pytest.mark.parametrize("command", MAPS_COMMANDS)
def test_maps_commands_take_a_random_init_as_the_eval_commands_do(tmp_path, capsys, monkeypatch, command):
    """model=random:<arch> (and a bare architecture name) is the seeded network of the eval commands'
    loader, and every picture says its maps are meaningless; it was refused as 'No such file or folder'."""
    titles = []
    real_save = dinokit.maps.commands.save_figure
    monkeypatch.setattr(
        dinokit.maps.commands,
        "save_figure",
        lambda path, fig: titles.append(fig._suptitle.get_text()) or real_save(path, fig),
    )
    reports = []
    for model in ["random:vit_micro_p4", "vit_micro_p4"]:
        assert main(maps_command_args(command, tmp_path, model)) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        assert "note: model=" in printed and "randomly initialised network" in printed
        reports.append(json.loads(printed[printed.index("{") :]))
    if command in ("attention", "pca", "similarity", "matches"):
        assert len(titles) == 2 and all("vit_micro_p4 RANDOM INIT (meaningless maps)" in t for t in titles)
    drop = {"model", "out", "results"}  # the same seeded network: the same numbers
    assert {k: v for k, v in reports[0].items() if k not in drop} == {
        k: v for k, v in reports[1].items() if k not in drop
    }


@pytest.mark.parametrize("command", ["attention", "pca", "similarity", "matches"])
def test_a_picture_is_never_written_over_an_input_image(tmp_path, capsys, command):
    """out= (or json=) naming an input image replaced the photo with the picture."""
    args = maps_command_args(command, tmp_path, "random:vit_micro_p4")
    photo = tmp_path / ("frames/f1.png" if command == "matches" else "a.png")
    before = photo.read_bytes()
    args = [f"out={photo}" if a.startswith("out=") else a for a in args]
    assert main(args) == 2
    assert f"out={photo} is one of the input images, and writing there would replace it" in capsys.readouterr().err
    assert photo.read_bytes() == before
    if command == "matches":
        json_photo = tmp_path / "a.json"
        Image.open(tmp_path / "a.png").save(json_photo, format="PNG")  # an image named .json
        args = [*maps_command_args(command, tmp_path, "random:vit_micro_p4"), f"json={json_photo}"]
        args = [f"image={json_photo}" if a.startswith("image=") else a for a in args]
        assert main(args) == 2 and f"json={json_photo} is one of the input images" in capsys.readouterr().err


def test_the_similarity_picture_says_what_its_colours_span(tmp_path, capsys, monkeypatch):
    """The heat map's colours run from the map's own minimum to its maximum, so a target without the
    chosen part looked as hot as one with it, under the bare title 'cosine similarity'; the panel
    now names the cosine range its colours span."""
    panels = {}
    real = dinokit.maps.commands.panel_figure
    monkeypatch.setattr(dinokit.maps.commands, "panel_figure", lambda p, **k: panels.update(p=p) or real(p, **k))
    assert main(maps_command_args("similarity", tmp_path, "random:vit_micro_p4")) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    title = panels["p"][1][0]
    low = float(title.split()[1])
    assert title == f"cosine {low:.3f} (dark) .. {report['max']:.3f} (bright)" and low < report["max"]
    assert np.isclose(panels["p"][2][1].min(), low, atol=5e-4)


@pytest.mark.parametrize("command", ["attention", "pca", "similarity"])
def test_large_photos_are_drawn_at_the_figure_size(tmp_path, capsys, monkeypatch, command):
    """A 24 MP photo was drawn whole, every head's map upsampled and coloured at full size for a figure
    about 800 px wide (visualize attention: 39 s and 3.2 GB for a 6000x4000 JPEG); the photos are drawn
    at most DRAWN_SIDE px on the long side, the chosen pixel of similarity marked where it lies."""
    panels = {}
    real = dinokit.maps.commands.panel_figure
    monkeypatch.setattr(dinokit.maps.commands, "panel_figure", lambda p, **k: panels.update(p=p) or real(p, **k))
    args = maps_command_args(command, tmp_path, "random:vit_micro_p4")
    Image.fromarray(np.zeros((2000, 3200, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    args = [a for a in args if a not in ("x=1", "y=1")] + (["x=3199", "y=0"] if command == "similarity" else [])
    assert main(args) == 0
    pictures = [p for _, p in panels["p"] if np.asarray(p).ndim == 3]
    assert pictures and all(p.shape == (DRAWN_SIDE * 5 // 8, DRAWN_SIDE, 3) for p in pictures)
    if command == "similarity":
        marked = np.argwhere(np.all(pictures[0] == (255, 0, 0), axis=-1))
        r = DRAWN_SIDE * 5 // 8 // 60
        assert marked.min(0).tolist() == [0, DRAWN_SIDE - 1 - r] and marked.max(0).tolist() == [r, DRAWN_SIDE - 1]


def test_a_pixel_outside_the_image_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """x=, y= outside the image were found only after the model was loaded (a released one downloaded)."""
    args = maps_command_args("similarity", tmp_path, "random:vit_micro_p4")
    monkeypatch.setattr(dinokit.maps.commands, "load", lambda *a: pytest.fail("loaded before checking x, y"))
    assert main([a if a != "x=1" else "x=24" for a in args]) == 2
    assert "pixel (24, 1) is outside the 24x16 image (x is the column, y the row)" in capsys.readouterr().err
