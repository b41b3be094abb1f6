"""File writing that never leaves a half-written file behind, and reading JSON with a clear error."""

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from dinokit.errors import DinokitError


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call write(tmp_path) on a temporary file next to `path`, then rename it into place: readers
    never see a half-written file, and an interrupted write leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path: str | Path):
    """Parsed JSON of `path`; a damaged file gets a DinokitError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DinokitError(
            f"{path} is not valid JSON ({e}); the file is damaged or truncated: download or export it again"
        ) from None


def write_json(path: str | Path, obj) -> None:
    """Atomically write `obj` as indented JSON."""
    text = json.dumps(obj, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path` to fill; when the block ends without error it is renamed
    to `path`, so readers see the whole folder or none of it. If `path` appeared meanwhile (another
    writer finished first), the new folder is discarded."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
