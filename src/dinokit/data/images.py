"""Finding and decoding images: any folder (recursive) or list file; bad files are skipped, not fatal.

Every image becomes 8-bit RGB: EXIF orientation applied; grayscale, 16-bit, float, palette, CMYK and
alpha images converted (alpha composited on white).
"""

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dinokit.errors import DinokitError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})
CLASS_INDEX_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")  # Pillow modes of a mask: one class index per pixel


def files_under(root: Path, extensions: frozenset[str] | tuple[str, ...]) -> list[Path]:
    """Sorted files under `root` (recursive) whose lower-case suffix is in `extensions`. Symlinked
    folders are followed (datasets are often assembled from links), each real folder once; a broken
    link is kept, so that it is reported as unreadable rather than silently missing. Hidden folders
    (`.ipynb_checkpoints`, `.cache`, ...), macOS's `__MACOSX` of a zip and its `._name` resource
    files are not data: they are left out (as class folders they would become classes)."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a second link to a folder already walked, or a link cycle
            subfolders.clear()
            continue
        seen.add(real)
        # sorted: which of two links to one folder is kept does not depend on the file system
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "__MACOSX")
        found += [
            Path(folder, name)
            for name in files
            if Path(name).suffix.lower() in extensions and not name.startswith("._")
        ]
    return sorted(p for p in found if p.is_file() or (p.is_symlink() and not p.exists()))


def plain_path(path: Path) -> Path:
    """`path` without `folder/..` detours (`imgs/x/../y/a.jpg` -> `imgs/y/a.jpg`), so that two spellings
    of one file are one path: a file listed twice is the same path twice, its embedding rows and index
    entries carry one name, and a subset list finds it. Lexical, as os.path.normpath (relative paths
    stay relative, a leading `..` stays), except where a `..` follows a symlinked folder, which the
    system resolves first: that path becomes its real path, the file it names."""
    if ".." not in path.parts:
        return path
    plain = Path(os.path.normpath(path))
    try:
        if path.exists() and not (plain.exists() and os.path.samefile(path, plain)):
            return Path(os.path.realpath(path))
    except OSError:  # unreadable along the way: the lexical form, reported when it is opened
        pass
    return plain


def list_images(source: str | Path) -> list[Path]:
    """Image paths of a folder (recursive, sorted; see `files_under`), of a list file (one path or
    `path,label` per line; see `read_list_file`), or a single image; `folder/..` detours taken out
    (`plain_path`)."""
    source = plain_path(Path(source).expanduser())
    if source.is_dir():
        paths = files_under(source, IMAGE_EXTENSIONS)
        if not paths:
            raise DinokitError(
                f"no images found under {source} (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        return paths
    if source.is_file() and source.suffix.lower() in IMAGE_EXTENSIONS:
        return [source]
    if source.is_file():
        paths = [path for path, _ in read_list_file(source)]
        if not paths:
            raise DinokitError(f"the list file {source} names no images")
        return paths
    raise DinokitError(
        f"image source not found: {source}{spaces_note(source)} (give a folder, an image, or a text file of paths)"
    )


def spaces_note(path: str | Path) -> str:
    """' (the path ends with a space: 'photos ')' where `path` starts or ends with white space, which an
    error message does not show (a path pasted with a space, a quoted value with one inside the quotes)."""
    text = str(path)
    ends = [end for end, space in (("starts", text[:1].isspace()), ("ends", text[-1:].isspace())) if space]
    return f" (the path {' and '.join(ends)} with a space: {text!r})" if ends else ""


PATH_HEADERS = ("path", "filename")  # a line whose first cell is one of these is a header
LABEL_HEADERS = ("label", "labels", "class", "classes", "class_name", "category", "target", "y")


def read_list_file(source: Path) -> list[tuple[Path, str | None]]:
    """(path, label or None) per line of a UTF-8 list file: one path, or CSV `path,label[,...]` cells
    (quoted cells, a byte-order mark and CRLF endings as spreadsheets write them). Relative paths are
    relative to the list file; blank lines, `#` comments and header lines (`is_header`) are skipped; a
    line that names an existing file as a whole is a path holding a comma, not `path,label`, and so is
    an unquoted `lr=1e-3,bs=64/a.png,cat` whose first cells name one (`path_holding_commas`). Bytes that
    are not UTF-8 are a file name's own (`ls > list.txt` of an old Latin-1 archive, or dinokit's lists:
    `dinokit.io.write_text`), read as Python lists such names, unless control bytes show a binary file."""
    data = source.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if any(byte < 0x20 and byte not in b"\t\n\r" for byte in data):  # a zip, a HEIC photo, ...
            raise DinokitError(
                f"{source} is neither an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) nor a UTF-8 text list of paths"
            ) from err
        text = data.decode("utf-8-sig", "surrogateescape")
    rows: list[tuple[Path, str | None]] = []
    for line in text.split("\n"):  # not splitlines: U+2028, U+0085, \x1c-\x1e may be in a file name
        line = line.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        cells = [line]
        if ("," in line or line.startswith('"')) and not list_path(source, line).is_file():
            cells = [cell.strip() for cell in next(csv.reader([line]))]
            if not line.startswith('"') and not list_path(source, cells[0]).is_file():
                cells = path_holding_commas(source, line) or cells
        path, label = list_path(source, cells[0]), (cells[1] if len(cells) > 1 else None)
        if cells[0].lower() in PATH_HEADERS or (not rows and label is not None and is_header(path, label)):
            continue
        rows.append((path, label))
    return rows


def path_holding_commas(source: Path, line: str) -> list[str] | None:
    """The cells of an unquoted CSV line whose path holds commas (`run=3,bs=64/a.png,cat`): the
    shortest run of its first cells that names an existing file, then the rest; None if none does."""
    parts = line.split(",")
    for k in range(2, len(parts)):
        if list_path(source, ",".join(parts[:k])).is_file():
            return [",".join(parts[:k]), *(cell.strip() for cell in parts[k:])]
    return None


def list_path(source: Path, text: str) -> Path:
    """A path as written in the list file `source`: relative ones are relative to its folder; `a/../b`
    is `b` (`plain_path`)."""
    path = Path(text).expanduser()
    return plain_path(path if path.is_absolute() else source.parent / path)


def is_header(path: Path, label: str) -> bool:
    """Whether a CSV's first line is a header such as `image,label` or `img,species`: no file at its
    path, and a column name as its label or no image extension on its path (a real image of a class
    named "label" stays a line)."""
    if path.is_file():
        return False
    return label.lower() in LABEL_HEADERS or path.suffix.lower() not in IMAGE_EXTENSIONS


def output_names(paths: list[Path], source: str | Path) -> list[str]:
    """A distinct output name (a relative path, no extension) per image: its path relative to
    the `source` folder (for one image or a list file `source`: to the deepest folder holding them all), so that
    photos/a/cat.jpg and photos/b/cat.jpg get a/cat and b/cat. Names that still clash (cat.jpg and
    cat.png, or a file listed twice; compared ignoring case) get the extension, then a number."""
    absolute = [os.path.abspath(p) for p in paths]
    root = plain_path(Path(source).expanduser())  # as list_images read it
    base = os.path.commonpath([os.path.dirname(p) for p in absolute])
    if root.is_dir() and all(p.startswith(os.path.join(os.path.abspath(root), "")) for p in absolute):
        base = os.path.abspath(root)  # else a name would climb out of the folder (`..`): never out of out=
    names, taken = [], set()
    for path in absolute:
        relative = Path(os.path.relpath(path, base))
        plain = str(relative.with_suffix(""))
        with_suffix = f"{plain}_{relative.suffix[1:]}"
        name, number = (plain if plain.casefold() not in taken else with_suffix), 2
        while name.casefold() in taken:
            name, number = f"{with_suffix}_{number}", number + 1
        taken.add(name.casefold())
        names.append(name)
    return names


class UnreadableImage(DinokitError):
    """A file that cannot be decoded as an image (commands that read many skip it); `reason` says why."""

    reason = ""


def open_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode `path` to an 8-bit RGB PIL image; an unreadable file raises DinokitError naming it.
    min_side: a JPEG may be decoded at a reduced scale whose sides stay >= min_side (`ReducedJpegDecode`)."""
    return open_image(path, rgb=True, min_side=min_side)


def open_image(path: str | Path, rgb: bool = False, what: str = "image", min_side: int | None = None) -> Image.Image:
    """Decode `path` in its EXIF orientation, as 8-bit RGB (`rgb`) or in its own mode (a mask); an
    unreadable file raises UnreadableImage (a DinokitError) naming it as `what`. With `min_side`, a
    JPEG is decoded at 1/2, 1/4 or 1/8 scale where both sides stay >= min_side (`ReducedJpegDecode`)."""
    try:
        # opened from a file object: Pillow's memory-mapped path (a file name) scrambles the pixels of an
        # uncompressed grayscale TIFF with an Orientation tag of 5-8 (Pillow 13)
        with open(path, "rb") as file, Image.open(file) as im:
            if min_side:
                im.draft(None, (min_side, min_side))  # JPEG only (other formats ignore it); square: any orientation
            im.load()
            im = upright(im)
            return to_rgb(im) if rgb else im.copy()
    except Exception as err:  # damaged files make Pillow raise OSError, ValueError, SyntaxError, TypeError, ...
        reason = "not an image format Pillow recognises" if isinstance(err, UnidentifiedImageError) else str(err)
        fix = "Check that the file is a complete image (jpg, png, webp, bmp, tiff), or remove it from the input."
        if isinstance(err, FileNotFoundError):
            reason = f"no such file{spaces_note(path)}"
            fix = "Check the spelling and the current folder, or pass an absolute path."
        if isinstance(err, IsADirectoryError):  # e.g. a folder given where one image is taken
            reason, fix = "it is a folder", f"Pass one {what} file there (a file inside it, e.g. {example_in(path)})."
        error = UnreadableImage(f"cannot read the {what} {path}: {reason}. {fix}")
        error.reason = reason
        raise error from err


def example_in(folder: str | Path) -> str:
    """The first image file under `folder` (for an error's example), or `folder/<name>.jpg`."""
    try:
        found = next((p for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS), None)
    except OSError:  # unreadable folder
        found = None
    return str(found or Path(folder) / "<name>.jpg")


def upright(im: Image.Image) -> Image.Image:
    """`im` turned by its EXIF orientation; as stored when the EXIF block itself cannot be parsed."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # e.g. SyntaxError for a damaged TIFF header inside the EXIF block
        return im


def exif_orientation(im: Image.Image) -> int:
    """The EXIF Orientation of `im` (1: upright, as stored), 1 when its EXIF block cannot be parsed."""
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block: `upright` keeps the image as stored
        return 1


def upright_size(path: str | Path) -> tuple[int, int] | None:
    """(H, W) of an image as `open_image` turns it (EXIF orientation), from its header alone; None if the
    header cannot be read (reading the whole file then decides)."""
    try:
        with open(path, "rb") as file, Image.open(file) as im:
            w, h = im.size
            turned = exif_orientation(im) in (5, 6, 7, 8)  # transposed or turned by 90 degrees
    except Exception:
        return None
    return (w, h) if turned else (h, w)


def same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether sizes a and b (both (W, H), or both (H, W)) have one aspect ratio, up to rounding each side
    to whole pixels: a mask or depth map of its image's size, or a scaled copy of it."""
    (wa, ha), (wb, hb) = a, b
    return abs(ha * wb / wa - hb) <= 1 or abs(wa * hb / ha - wb) <= 1


def open_images(paths: list[Path]) -> tuple[list[tuple[Path, Image.Image]], list[Path]]:
    """Decode `paths` once: ([(path, RGB image)] of the readable ones, [unreadable paths]), for
    commands that take a folder and skip bad files. Raises DinokitError when none is readable."""
    opened, bad = [], []
    first = None
    for path in paths:
        try:
            opened.append((path, open_rgb(path)))
        except UnreadableImage as err:
            bad.append(path)
            first = first or err
    if not opened:
        raise DinokitError(f"none of the {len(paths)} images can be read; the first: {first}")
    return opened, bad


def check_readable(paths: list, source: str | Path, sample: int = 64) -> None:
    """A clear error before any work when none of `paths` (an even sample of at most `sample` of them)
    decodes, naming the first and why."""
    probe = paths[:: max(1, len(paths) // sample)][:sample]
    first = None
    for path in probe:
        try:
            open_rgb(path)
            return
        except UnreadableImage as err:
            first = first or err
    which = f"the {len(paths)}" if len(probe) == len(paths) else f"{len(probe)} sampled"
    raise DinokitError(f"none of {which} images of {source} could be read; the first: {first}")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit images are rescaled by their dtype range, float images by the
    range of their finite values (NaN: black, +-inf: the ends)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            finite = a[np.isfinite(a)]
            lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
            a = np.nan_to_num((np.clip(a, lo, hi) - lo) / max(hi - lo, 1e-12) * 255.0, nan=0.0)
        else:
            a = a / 257.0 if a.max() > 255 or im.mode.startswith("I;16") else a
        im = Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8), mode="L")  # rounded: 1.0 is 255
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB") if im.mode != "RGB" else im


class ReducedJpegDecode(torch.nn.Module):
    """The first step of a transform whose next step shrinks the image: a JPEG may then be decoded at
    1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, through Pillow's `draft`) as long as both sides stay
    >= `min_side`, which the transforms set to twice the size their resize makes (the gap Pillow's
    own `thumbnail` keeps). A 4000 x 3000 photo then decodes in a fifth of the time for a 224 px input,
    and a ViT-S/14's CLS equals the full decode's to a cosine of 0.999998 (docs/benchmarks.md).

    `ImageFiles` applies it when it opens a file (`open_rgb(path, min_side)`); to an image already
    decoded it does nothing. It is part of the transform, so `describe` records it."""

    def __init__(self, min_side: int) -> None:
        super().__init__()
        self.min_side = min_side

    def forward(self, image):
        return image

    def __repr__(self) -> str:
        return f"ReducedJpegDecode(min_side={self.min_side})"


def crops_min_side(crops: list[tuple[int, Sequence[float]]]) -> int:
    """The smallest short side at which an image may be decoded (`ReducedJpegDecode`) without any of
    `crops`, (size, (min area scale, max)) RandomResizedCrops at aspect ratios 3/4..4/3, being
    upsampled: a crop reads a region of at least scale * H * W pixels whose shorter side is at least
    short_side * sqrt(scale * 3/4), which must be >= size; and at least twice the largest crop.
    DINOv2's 224 px (0.32..1) and 98 px (0.05..0.32) crops: 507."""
    return max(max(2 * size, math.ceil(size / math.sqrt(scale[0] * 3 / 4))) for size, scale in crops)


def decode_min_side(transform) -> int | None:
    """The short side a transform lets large JPEGs be decoded at: the `min_side` of a torchvision
    Compose that starts with ReducedJpegDecode, or a multi-crop augmentation's `decode_min_side`; else
    None (decode whole). The datasets that open files (ImageFiles, MultiCropDataset) read it here."""
    steps = getattr(transform, "transforms", None)
    first = steps[0] if steps else None
    if isinstance(first, ReducedJpegDecode):
        return first.min_side
    return getattr(transform, "decode_min_side", None)


class ImageFiles(torch.utils.data.Dataset):
    """Dataset over a list of paths: item i is (transform(image), i), or (None, i) when the file cannot
    be decoded. Use `collate_skipping_bad` so that bad files drop out of the batch and are reported.
    A transform that starts with `ReducedJpegDecode` has its JPEGs decoded at a reduced scale."""

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.min_side = decode_min_side(transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = open_rgb(self.paths[i], self.min_side)
        except UnreadableImage:  # corrupt, truncated, zero-byte, not an image: skipped and counted
            return None, i
        return self.transform(image), i  # an error here is a bug to see, not a bad file to count


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor | None, torch.Tensor, list[int]]:
    """(stacked images or None, indices of the good items, indices of the bad ones)."""
    good = [(x, i) for x, i in batch if x is not None]
    bad = [i for x, i in batch if x is None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), bad
    return torch.stack([x for x, _ in good]), torch.tensor([i for _, i in good]), bad
