import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data.images import ImageFiles, collate_skipping_bad, list_images, open_images, open_rgb
from dinokit.data.transforms import IMAGENET_MEAN, describe, eval_transform
from dinokit.errors import DinokitError


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "a" / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(tmp_path / "a" / "b" / "gray.png")
    Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16)).save(tmp_path / "a" / "b" / "deep.png")
    Image.new("CMYK", (12, 10), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png", transparency=0)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    good = (tmp_path / "a" / "rgb.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def test_list_images_recursive_sorted_and_list_files(folder):
    paths = list_images(folder)
    names = [p.name for p in paths]
    assert "notes.txt" not in names and "gray.png" in names and paths == sorted(paths)
    lst = folder / "list.txt"
    lst.write_text("# comment\na/rgb.jpg\n\ncmyk.jpg,3\n")
    assert list_images(lst) == [folder / "a" / "rgb.jpg", folder / "cmyk.jpg"]
    (folder / "none").mkdir()
    with pytest.raises(DinokitError, match="no images found"):
        list_images(folder / "none")
    with pytest.raises(DinokitError, match="not found"):
        list_images(folder / "missing")


def test_symlinked_folders_are_followed_once_and_commas_in_paths_kept(tmp_path):
    real = tmp_path / "real"
    (real / "cats").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (4, 4)).save(real / "cats" / f"{i}.png")
    data = tmp_path / "data"
    data.mkdir()
    (data / "cats").symlink_to(real / "cats")  # a dataset assembled from links
    (data / "again").symlink_to(real / "cats")  # the same folder twice
    (data / "cats" / "loop").symlink_to(data)  # a cycle
    paths = list_images(data)
    assert [p.relative_to(data).as_posix() for p in paths] == ["again/0.png", "again/1.png", "again/2.png"]
    Image.new("RGB", (4, 4)).save(tmp_path / "a,b.png")
    (tmp_path / "list.txt").write_text("a,b.png\nreal/cats/0.png,cat\n")
    assert list_images(tmp_path / "list.txt") == [tmp_path / "a,b.png", real / "cats" / "0.png"]


def test_hidden_folders_and_macos_zip_leftovers_are_not_data(tmp_path):
    """A folder unzipped from a Mac (__MACOSX/, ._name resource files) or opened in Jupyter
    (.ipynb_checkpoints/): none of it is an image or a class."""
    from dinokit.data.labelled import read_labelled

    for name in ("cat/a.png", "dog/b.png", "cat/.ipynb_checkpoints/a.png", "__MACOSX/cat/._a.png", "dog/._b.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    images = [tmp_path / "cat" / "a.png", tmp_path / "dog" / "b.png"]
    assert list_images(tmp_path) == images
    assert read_labelled(tmp_path) == (images, [0, 1], ["cat", "dog"])


def test_a_broken_link_is_an_unreadable_image_not_silently_dropped(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "moved.png").symlink_to(tmp_path / "gone.png")  # its target was moved away
    (tmp_path / "folder.png").mkdir()  # a folder named like an image is no file at all
    paths = list_images(tmp_path)
    assert paths == [tmp_path / "a.png", tmp_path / "moved.png"]
    assert open_images(paths)[1] == [tmp_path / "moved.png"]  # skipped and counted


def test_an_unreadable_image_is_a_clear_error_naming_it(folder):
    with pytest.raises(DinokitError, match=r"cannot read the image .*trunc\.jpg"):
        open_rgb(folder / "trunc.jpg")
    opened, bad = open_images([folder / "a" / "rgb.jpg", folder / "trunc.jpg"])
    assert [path for path, _ in opened] == [folder / "a" / "rgb.jpg"] and bad == [folder / "trunc.jpg"]
    assert opened[0][1].mode == "RGB"
    with pytest.raises(DinokitError, match="none of the 1 images can be read"):
        open_images([folder / "trunc.jpg"])


def test_every_mode_becomes_8bit_rgb(folder):
    for name in ("a/rgb.jpg", "a/b/gray.png", "a/b/deep.png", "cmyk.jpg", "clear.png", "pal.png"):
        im = open_rgb(folder / name)
        assert im.mode == "RGB", name
    assert open_rgb(folder / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # alpha over white
    assert open_rgb(folder / "pal.png").getpixel((0, 0)) == (255, 0, 0)
    deep = np.asarray(Image.open(folder / "a" / "b" / "deep.png")).astype(np.float64)
    assert np.abs(np.asarray(open_rgb(folder / "a" / "b" / "deep.png"))[..., 0] - deep / 257).max() <= 1


def test_a_float_image_is_scaled_by_its_finite_values(tmp_path):
    values = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)
    expected = np.asarray(open_rgb_of(tmp_path / "plain.tif", values))
    # the range's ends are 0 and 255 (truncation made the top 254), the rest rounded
    assert np.array_equal(expected[..., 0], np.rint(values * 255).astype(np.uint8))
    with_inf, with_nan = values.copy(), values.copy()
    with_inf[1, 2], with_nan[1, 2] = np.inf, np.nan  # one +inf pixel made the whole image black
    others = np.ones((4, 6), dtype=bool)
    others[1, 2] = False
    infinite = np.asarray(open_rgb_of(tmp_path / "inf.tif", with_inf))
    assert np.array_equal(infinite[1, 2], expected[3, 5]) and np.array_equal(infinite[others], expected[others])
    missing = np.asarray(open_rgb_of(tmp_path / "nan.tif", with_nan))
    assert missing[1, 2].tolist() == [0, 0, 0] and np.array_equal(missing[others], expected[others])


def open_rgb_of(path, values: np.ndarray) -> Image.Image:
    Image.fromarray(values, mode="F").save(path)
    return open_rgb(path)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert open_rgb(tmp_path / "rot.jpg").size == (10, 30)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_exif_orientation_of_a_grayscale_tiff_turns_the_pixels_instead_of_scrambling_them(tmp_path, dtype):
    scale = 257 if dtype == np.uint16 else 1  # 16-bit values are rescaled to 8 bits
    stored = np.arange(24, dtype=dtype).reshape(4, 6) * 10 * scale
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "gray.tif", exif=exif)
    shown = np.asarray(open_rgb(tmp_path / "gray.tif"))[..., 0]
    assert np.array_equal(shown, np.rot90(stored, -1) // scale)


def test_bad_files_are_skipped_and_reported(folder):
    paths = list_images(folder)
    ds = ImageFiles(paths, eval_transform(14))
    batch = collate_skipping_bad([ds[i] for i in range(len(ds))])
    images, good, bad = batch
    bad_names = sorted(paths[i].name for i in bad)
    assert bad_names == ["empty.jpg", "junk.png", "trunc.jpg"]
    assert images.shape == (len(paths) - 3, 3, 14, 14) and len(good) == len(paths) - 3
    assert collate_skipping_bad([(None, 0)])[0] is None


def test_eval_transform_official_at_224_and_resize_policy():
    im = Image.fromarray(np.full((300, 400, 3), 124, dtype=np.uint8))
    t = eval_transform(224)
    assert [type(s).__name__ for s in t.transforms[:3]] == ["ReducedJpegDecode", "Resize", "CenterCrop"]
    assert t.transforms[0].min_side == 512 and t.transforms[1].size == [256]
    official = eval_transform(224, reduced_decode=False)
    assert [type(s).__name__ for s in official.transforms[:2]] == ["Resize", "CenterCrop"]
    assert torch.equal(official(im), t(im))
    x = t(im)
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[0], torch.full((224, 224), (124 / 255 - IMAGENET_MEAN[0]) / 0.229), atol=1e-5)
    assert eval_transform((112, 168), resize_policy="resize")(im).shape == (3, 112, 168)


def test_any_decoding_failure_is_a_dinokit_error_and_a_damaged_exif_block_is_ignored(tmp_path):
    tiff = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiff, "TIFF")
    data = bytearray(tiff.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", data[ifd : ifd + 2])[0], 12):
        if struct.unpack("<H", data[entry : entry + 2])[0] == 273:  # StripOffsets, made a RATIONAL
            data[entry + 2 : entry + 4] = struct.pack("<H", 5)
    (tmp_path / "bad.tif").write_bytes(bytes(data))  # Pillow raises TypeError in load()
    with pytest.raises(DinokitError, match=r"cannot read the image .*bad\.tif"):
        open_rgb(tmp_path / "bad.tif")
    Image.new("RGB", (6, 4), (0, 0, 255)).save(tmp_path / "exif.png", exif=b"MX\x00*\x00\x00\x00\x08")
    im = open_rgb(tmp_path / "exif.png")  # SyntaxError from the EXIF block: the pixels are fine, used as stored
    assert im.size == (6, 4) and im.getpixel((0, 0)) == (0, 0, 255)
    opened, bad = open_images([tmp_path / "exif.png", tmp_path / "bad.tif"])  # visualize pca's folder reader
    assert [path.name for path, _ in opened] == ["exif.png"] and [path.name for path in bad] == ["bad.tif"]


def test_list_files_as_spreadsheets_write_them_give_every_command_the_same_paths(tmp_path):
    from dinokit.data.labelled import read_labelled

    for name in ("a,b.png", "c d.png", "e.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    body = '"a,b.png",cat\r\n   \r\n"c d.png",dog\r\n# note\r\ne.png,cat\r\n'
    (tmp_path / "excel.csv").write_bytes(("\ufeffimage,species\r\n" + body).encode())  # BOM, header, CRLF
    (tmp_path / "bom.csv").write_bytes(("\ufeff" + body).encode())
    expected = [tmp_path / "a,b.png", tmp_path / "c d.png", tmp_path / "e.png"]
    for name in ("excel.csv", "bom.csv"):
        assert list_images(tmp_path / name) == expected, name  # pretrain / embed / segment / index search
        assert read_labelled(tmp_path / name) == (expected, [0, 1, 0], ["cat", "dog"]), name  # eval knn / linear
    (tmp_path / "archive.zip").write_bytes(b"PK\x03\x04\xff\xfe binary")
    with pytest.raises(DinokitError, match="nor a UTF-8 text list of paths"):
        list_images(tmp_path / "archive.zip")


def test_an_error_of_the_transform_is_raised_not_counted_as_a_bad_file(folder):
    """Every exception of an item was taken for an unreadable file: a bug in a transform silently
    emptied a dataset into 'bad files'."""

    def broken(image):
        raise RuntimeError("a bug in the transform")

    with pytest.raises(RuntimeError, match="a bug in the transform"):
        dataset = ImageFiles(list_images(folder), broken)
        [dataset[i] for i in range(len(dataset))]  # the bad files among them return (None, i)


def test_large_jpegs_decode_at_a_reduced_scale_that_keeps_twice_the_resize(tmp_path):
    """ReducedJpegDecode: a JPEG whose sides are >= 2 x min_side decodes at 1/2, 1/4 or 1/8 scale, both
    sides staying >= min_side (in any EXIF orientation); PNGs and small JPEGs decode whole; the model
    input differs from a full decode's by resampling only."""
    from dinokit.data.images import decode_min_side

    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((4000, 3000)))
    big = tmp_path / "big.jpg"
    Image.fromarray(smooth).save(big, quality=95)
    rotated = tmp_path / "rotated.jpg"  # stored 4000 x 3000, shown 3000 x 4000 (EXIF orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(smooth).save(rotated, quality=95, exif=exif)
    Image.fromarray(smooth[:600, :800]).save(tmp_path / "small.jpg", quality=95)
    Image.fromarray(smooth).save(tmp_path / "big.png")

    assert open_rgb(big, 512).size == (1000, 750)  # 1/4: 1/8 would give 500 x 375 < 512
    assert open_rgb(big, 1500).size == (2000, 1500)
    assert open_rgb(big).size == (4000, 3000)
    assert open_rgb(rotated, 512).size == (750, 1000)
    assert open_rgb(tmp_path / "small.jpg", 512).size == (800, 600)
    assert open_rgb(tmp_path / "big.png", 512).size == (4000, 3000)

    reduced, whole = eval_transform(224), eval_transform(224, reduced_decode=False)
    assert decode_min_side(reduced) == 512 and decode_min_side(whole) is None
    assert decode_min_side(eval_transform((112, 168), resize_policy="resize")) == 336
    assert decode_min_side(eval_transform(98, resize_policy="aspect")) == 196
    assert "ReducedJpegDecode(min_side=512)" in describe(reduced) and "Reduced" not in describe(whole)
    fast, full = ImageFiles([big], reduced)[0][0], ImageFiles([big], whole)[0][0]
    assert fast.shape == full.shape == (3, 224, 224)
    assert 0 < (fast - full).abs().mean() < 0.01  # normalised units: resampling differences only


def test_a_list_file_splits_at_newlines_only(tmp_path):
    """str.splitlines also splits at U+2028, U+0085 and \\x1c-\\x1e, characters a file name may hold: a
    list naming such a file was read as two paths."""
    from pathlib import Path

    from dinokit.data.images import read_list_file

    listing = tmp_path / "list.txt"
    listing.write_text("/d/a\u2028b.jpg\r\n/d/c\x1cd.jpg,cat\n  /d/e.jpg  \n", encoding="utf-8")
    assert read_list_file(listing) == [
        (Path("/d/a\u2028b.jpg"), None),
        (Path("/d/c\x1cd.jpg"), "cat"),
        (Path("/d/e.jpg"), None),
    ]


def test_a_missing_image_is_reported_as_not_found(tmp_path):
    from dinokit.data.images import open_image

    with pytest.raises(DinokitError, match=r"cannot read the image .*nope\.jpg: no such file\. Check the spelling"):
        open_image(tmp_path / "nope.jpg")
