"""Labelled image sets: a `root/<class>/*` folder (as torchvision's ImageFolder) or a CSV / text list
of `path,label` lines (relative paths are relative to the list file). A first line whose path cell is
no file, and is no image name or has a column name (label, class, ...) as label, is a header: skipped."""

import csv
from pathlib import Path

from dinokit.data.images import IMAGE_EXTENSIONS, files_under
from dinokit.errors import DinokitError

PATH_HEADERS = ("path", "filename")  # a line starting with these is always a header
LABEL_HEADERS = ("label", "labels", "class", "classes", "class_name", "category", "target", "y")


def read_labelled(source: str | Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """(paths, integer labels, class names). `classes` fixes the name -> index mapping (e.g. to give a
    validation set the training set's indices); by default classes are sorted names."""
    source = Path(source).expanduser()
    if source.is_dir():
        pairs = [
            (p, p.relative_to(source).parts[0])
            for p in files_under(source, IMAGE_EXTENSIONS)
            if len(p.relative_to(source).parts) > 1
        ]
        if not pairs:
            raise DinokitError(f"no labelled images under {source}: expected {source}/<class name>/<image files>")
    elif source.is_file():
        pairs = []
        with source.open(newline="") as f:
            for row in csv.reader(f):
                if not row or row[0].strip().startswith("#") or row[0].strip() in PATH_HEADERS:
                    continue
                if len(row) < 2:
                    raise DinokitError(f"{source}: line {row!r} is not `path,label`")
                p = Path(row[0].strip()).expanduser()
                p = p if p.is_absolute() else source.parent / p
                if not pairs and is_header(p, row[1].strip()):
                    continue
                pairs.append((p, row[1].strip()))
        if not pairs:
            raise DinokitError(f"{source} lists no `path,label` lines")
    else:
        raise DinokitError(f"labelled dataset not found: {source} (a <class>/<images> folder or a path,label CSV)")
    names = classes if classes is not None else sorted({label for _, label in pairs})
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({label for _, label in pairs} - set(index))
    if unknown:
        raise DinokitError(f"{source} has classes not in the reference class list: {unknown[:10]}")
    return [p for p, _ in pairs], [index[label] for _, label in pairs], list(names)


def is_header(path: Path, label: str) -> bool:
    """Whether a CSV's first line is a header such as `image,label` or `img,species`: no file at its
    path, and a column name as its label or no image extension on its path (a real image of a class
    named "label" stays a line)."""
    if path.is_file():
        return False
    return label.lower() in LABEL_HEADERS or path.suffix.lower() not in IMAGE_EXTENSIONS
