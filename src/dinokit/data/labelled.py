"""Labelled image sets: a `root/<class>/*` folder (as torchvision's ImageFolder) or a CSV / text list
of `path,label` lines, read as every list file (`dinokit.data.images.read_list_file`: relative paths are
relative to the list file; quoted cells, comments and a header line are understood)."""

from pathlib import Path

from dinokit.data.images import IMAGE_EXTENSIONS, files_under, plain_path, read_list_file, spaces_note
from dinokit.errors import DinokitError


def read_labelled(
    source: str | Path, classes: list[str] | None = None, reference: str | Path | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """(paths, integer labels, class names). `classes` fixes the name -> index mapping (e.g. to give a
    validation set the training set's indices; `reference`: where they come from, for the error on a
    label outside them); by default classes are sorted names."""
    source = plain_path(Path(source).expanduser())  # as list_images: no `folder/..` detours
    if source.is_dir():
        pairs = [
            (p, p.relative_to(source).parts[0])
            for p in files_under(source, IMAGE_EXTENSIONS)
            if len(p.relative_to(source).parts) > 1
        ]
        if not pairs:
            raise DinokitError(f"no labelled images under {source}: expected {source}/<class name>/<image files>")
    elif source.is_file() and source.suffix.lower() in IMAGE_EXTENSIONS:  # read as a list, it fails oddly
        raise DinokitError(
            f"{source} is one image; a labelled dataset is a folder of <class>/<image files> folders, or a "
            "CSV of `path,label` lines"
        )
    elif source.is_file():
        pairs = []
        for path, label in read_list_file(source):
            if label is None:
                raise DinokitError(f"{source}: the line naming {path} is not `path,label`")
            if not label:  # `a.png,`: a class named '' of its own
                raise DinokitError(f"{source}: the line naming {path} has an empty label; give its class name")
            pairs.append((path, label))
        if not pairs:
            raise DinokitError(f"{source} lists no `path,label` lines")
    else:
        raise DinokitError(
            f"labelled dataset not found: {source}{spaces_note(source)} (a <class>/<images> folder or a path,label CSV)"
        )
    names = classes if classes is not None else sorted({label for _, label in pairs})
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({label for _, label in pairs} - set(index))
    if unknown:
        raise unknown_classes_error(source, unknown, list(names), reference)
    return [p for p, _ in pairs], [index[label] for _, label in pairs], list(names)


def unknown_classes_error(source: Path, unknown: list[str], names: list[str], reference) -> DinokitError:
    """The error for labels of `source` that are no class of `reference` (classes `names`): a typo, or
    a class without images there (an empty class folder is named as such)."""
    where = str(reference) if reference is not None else "the reference split"
    shown = ", ".join(names[:20]) + (f" ... (+{len(names) - 20} more)" if len(names) > 20 else "")
    empty = [
        f"{Path(reference) / name} holds no image"
        for name in unknown
        if reference is not None and (Path(reference).expanduser() / name).is_dir()
    ]
    return DinokitError(
        f"{source} has labels that are no class of {where}: {unknown[:10]}"
        + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
        + f" ({where}'s classes: {shown}). "
        + (f"{'; '.join(empty[:3])}. " if empty else "")
        + f"Check the labels for typos; a class can only be predicted with images of it in {where}"
    )
