"""File writing that never leaves a half-written file behind, and reading JSON with a clear error."""

import contextlib
import errno
import glob
import json
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from dinokit.errors import DinokitError


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call write(tmp_path) on a temporary file `.<name>.tmp-<tag>` next to `path` (writer_tag), then
    rename it into place: readers never see a half-written file, and an interrupted write leaves the
    previous file intact. The data and the rename are flushed to disk (fsync) before returning, so
    that a caller may delete older files (e.g. checkpoints) without a power cut leaving it an empty new
    one. A writer's error on a full disk is an OSError (ENOSPC) naming `path`. What writers killed
    mid-write left in the folder is removed first (remove_dead_writers), unless no other process has
    changed the folder since this one last wrote there (folder_stamps)."""
    path = Path(path)
    unchanged = path.parent in folder_stamps and folder_stamps[path.parent] == folder_stamp(path.parent)
    others_locked = not unchanged and remove_dead_writers(path.parent)
    with writer_tag(path) as tag:
        tmp = path.with_name(f".{path.name}.tmp-{tag}")
        try:
            try:
                write(str(tmp))
            except Exception as e:
                if not isinstance(e, OSError) and disk_full(path.parent):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
                raise
            os.chmod(tmp, file_mode(path))
            sync(tmp)
            os.replace(tmp, path)
            sync(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
    if others_locked:
        folder_stamps.pop(path.parent, None)  # look again next time: one of them may die meanwhile
    else:
        folder_stamps[path.parent] = folder_stamp(path.parent)


# the modification time of each folder after this process's last atomic_write there, where no other
# writer's lock was held: while it stays the same, no other process has written there (nor died
# writing), so a listing of the folder at each write (O(entries): 4 ms, 5 writes' time, among 10,000
# files) is spared
folder_stamps: dict[Path, int | None] = {}


def folder_stamp(folder: Path) -> int | None:
    """The modification time (ns) of `folder`, None where it is missing."""
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


def atomic_write_large(path: str | Path, write: Callable[[str], object]) -> None:
    """atomic_write of a file whose writing takes long enough to be killed (a download, an exported
    model) and whose writer makes temporary files of its own (torch.hub's .partial): all are written
    in a writers_folder beside `path`, which the next write of `path` removes once its writer is dead."""
    path = Path(path)
    with writers_folder(path) as folder:
        atomic_write(folder / path.name, write)
        os.chmod(folder / path.name, file_mode(path))  # that of the file it replaces, as atomic_write's
        os.replace(folder / path.name, path)
        sync(path.parent)


def disk_full(folder: Path, margin: int = 2**20) -> bool:
    """Whether the file system of `folder` has (almost) no space left: what a writer's own error means
    when it does not say so (torch.save: "unexpected pos", safetensors: a SafetensorError)."""
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def file_mode(path: Path) -> int:
    """The permission bits a file written at `path` should have: those of the file it replaces, else
    those of a new file under the process umask. (Writers such as safetensors >= 0.8 create 0600 files,
    which other users could not read.)"""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~process_umask()


def process_umask() -> int:
    """The process umask, read from /proc on Linux: setting it to learn it (os.umask) would give files
    that other threads create meanwhile the wrong mode."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o077)  # elsewhere: a restrictive mode for the instant it is set
    os.umask(umask)
    return umask


# errors of fsync on a folder from file systems that do not sync folders (some network and FUSE ones)
FOLDER_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def sync(path: Path) -> None:
    """fsync a file or a folder (a folder: its entries, e.g. a rename); a no-op where the platform
    cannot open folders (Windows) or the file system refuses to sync them."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if not (e.errno in FOLDER_SYNC_UNSUPPORTED and stat.S_ISDIR(os.fstat(fd).st_mode)):
            raise
    finally:
        os.close(fd)


def prepare_output(
    path: str | Path, folder: bool = False, example: str = "model.pth", create: bool = True, suffix: str | None = None
) -> Path:
    """`path` checked for writing one file (or, with `folder`, a folder), its parent folders created
    unless `create` is False; with `suffix` (e.g. ".png") the file's name must end in it.

    Raises DinokitError, before any work is done, if `path` is an existing folder where a file is to
    be written (`example` names a file to suggest inside it), an existing file where a folder is to
    be written, or if its folder cannot be created or written to.
    """
    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise DinokitError(
            f"cannot write to {path}: it is an existing file, where a folder is to be written. "
            f"Pass a folder path instead (new or existing), e.g. {path.with_name(path.stem + '_export')}"
        )
    if not folder and path.is_dir():
        raise DinokitError(
            f"cannot write to {path}: it is an existing folder, where one file is to be written. "
            f"Pass a file path instead, e.g. {path / example}"
        )
    if suffix is not None and path.suffix.lower() != suffix:
        raise DinokitError(
            f"cannot write to {path}: the file is written as {suffix[1:].upper()}, so its name must end in {suffix}; "
            f"pass e.g. {path.with_suffix(suffix) if path.suffix else path.with_name(path.name + suffix)}"
        )
    parent = path if folder else path.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise DinokitError(
            f"cannot write to {path}: {existing} is a file, not a folder. Pass a path in a folder you can write to"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DinokitError(
            f"cannot write to {path}: no permission to write in {existing}. Pass a path in a folder you can write to"
        )
    if create:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DinokitError(
                f"cannot create the folder {parent} for {path} ({e.strerror or e}). "
                "Pass a path in a folder you can write to"
            ) from None
    return path


# The file that marks a folder as the output of a command: one command's out folder given to another
# would mix their files (a pretraining run's checkpoints beside an embedding's shards, ...).
OUTPUT_MARKERS = {
    "config.yaml": "a training run (dinokit pretrain / finetune)",
    "embed_config.json": "an embedding (dinokit embed)",
    "index.json": "a retrieval index (dinokit index build)",
    "knn.json": "eval knn results",
    "linear.json": "eval linear results",
    "segmentation.json": "eval segmentation results",
    "depth.json": "eval depth results",
    "segment.json": "dinokit segment results",
    "track.json": "dinokit track results",
    "video.json": "eval video results",
    "curation.json": "a curation step (dinokit curate)",
}


def refuse_other_outputs(folder: str | Path, own: tuple[str, ...], command: str) -> None:
    """A DinokitError, before any work, where `folder` holds another command's output (an
    OUTPUT_MARKERS file not among `own`, the markers `command` itself writes or shares)."""
    folder = Path(folder).expanduser()
    found = [name for name in OUTPUT_MARKERS if name not in own and (folder / name).is_file()]
    if found:
        raise DinokitError(
            f"out={folder} holds {OUTPUT_MARKERS[found[0]]} ({found[0]}), which {command} would mix its own "
            "files with: choose another out folder"
        )


def refuse_output_over_inputs(out: str | Path, reader: str, **inputs: str | None) -> None:
    """A DinokitError, before any work, where `out` is, or is a folder holding, one of the existing files
    or folders `inputs` (key: path, None: not given) that `reader` reads: writing there would replace it."""
    target = Path(out).expanduser().resolve()
    for key, given in inputs.items():
        source = Path(given).expanduser().resolve() if given is not None else None
        if source is not None and source.exists() and (source == target or target in source.parents):
            raise DinokitError(
                f"out={out} {'is' if source == target else 'holds'} the {key}= "
                f"{'folder' if source.is_dir() else 'file'} {reader} reads ({given}), and writing there would "
                "replace it: pass another out="
            )


def refuse_inputs_as_outputs(outputs: dict[str, str | None], inputs: list) -> None:
    """DinokitError, before any work, where an output file (key: path, None: not written) is one of
    the input images: the picture would replace the photo."""
    given = {Path(p).expanduser().resolve() for p in inputs}
    for key, path in outputs.items():
        if path is not None and Path(path).expanduser().resolve() in given:
            other = Path(path).with_name(f"{Path(path).stem}_{key}{Path(path).suffix}")
            raise DinokitError(
                f"{key}={path} is one of the input images, and writing there would replace it: pass another "
                f"{key}= path, e.g. {other}"
            )


def refuse_overwriting_inputs(out_dir: Path, outputs: Iterable[Path], inputs: Iterable[str | Path | None]) -> None:
    """A DinokitError, before any work, where one of the files `outputs` to be written in the folder
    `out_dir` is one of `inputs` (None: not given): out= the folder of the images, a mask or the ground
    truth would replace them (and a mask scored against itself would score 1)."""
    given = {Path(p).expanduser().resolve() for p in inputs if p is not None}
    for target in outputs:
        if Path(target).expanduser().resolve() in given:
            raise DinokitError(
                f"out={out_dir} would overwrite the input {target} with an output: choose an out folder apart from "
                "the input files"
            )


def refuse_files_no_run_wrote(
    folder: str | Path, names: Iterable[str | Path], marks: tuple[str, ...], command: str
) -> None:
    """A DinokitError, before any work, where `folder` holds none of `marks` (what a `command` run writes
    there before any other file) but some of `names` (paths relative to it) that the run would replace
    or remove: files of the user's (out= the ground-truth masks, out=. in a project)."""
    folder = Path(folder).expanduser()
    if any((folder / mark).exists() for mark in marks):
        return
    found = [str(name) for name in names if (folder / name).exists()]
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise DinokitError(
            f"out={folder} holds {', '.join(found[:3])}{more} but no {' or '.join(marks)} of a {command} run, "
            "so no such run wrote them, and this one would replace them: choose another out folder (a new or "
            "empty one, or an earlier run's)"
        )


def file_stamps(paths: Iterable[str | Path]) -> list[list[int]]:
    """[size, modification time in ns] of each file, [-1, -1] where it cannot be stat'ed: what the caches
    and resumable runs compare to tell that a file changed since it was read, without reading it (a file
    rewritten with the same size and the same modification time cannot be told apart)."""
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
            stamps.append([st.st_size, st.st_mtime_ns])
        except OSError:
            stamps.append([-1, -1])
    return stamps


def read_json(path: str | Path, fix: str = "download or export it again"):
    """Parsed JSON of `path`; a damaged file gets a DinokitError naming it and `fix`, what to do."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DinokitError(f"{path} is not valid JSON ({e}); the file is damaged or truncated: {fix}") from None


def path_bytes(text: str) -> bytes:
    """`text` as UTF-8, with the bytes of file names that are not UTF-8 kept as they were: Python lists
    such a name (`caf\\xe9.jpg` of an old Latin-1 archive) as surrogate escapes (`caf\\udce9.jpg`, PEP 383),
    which a plain `.encode()` refuses mid-job. Hashes of paths and the lists of paths dinokit writes
    (`write_text`) go through this, so a list read back (`read_text`) names the same files."""
    return text.encode("utf-8", "surrogateescape")


def shown(path: str | Path) -> str:
    """`path` as text a picture or a terminal can show: bytes of a name that are not UTF-8 as U+FFFD."""
    return path_bytes(str(path)).decode("utf-8", "replace")


def write_text(path: str | Path, text: str) -> None:
    """Atomically write `text` (lists of paths, CSVs) as UTF-8 whatever the locale (`path_bytes`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(path_bytes(text)))


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file that `write_text` wrote (a leading byte-order mark dropped), bytes that
    are not UTF-8 as surrogate escapes: the file names they were."""
    return Path(path).read_bytes().decode("utf-8-sig", "surrogateescape")


def write_json(path: str | Path, obj) -> None:
    """Atomically write `obj` as indented JSON."""
    text = json.dumps(obj, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


@contextlib.contextmanager
def atomic_folder(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path` to fill; when the block ends without error it is renamed
    to `path`, so readers see the whole folder or none of it. If `path` appeared meanwhile (another
    writer finished first), the new folder is discarded.

    With `replace`, an existing `path` is replaced whole instead: it is renamed aside (to
    `.<name>.old-<tag>`), the new folder (given the old one's permission bits) renamed in, and the old
    one removed, so a reader never sees files of both. An error in the block or in the swap leaves
    `path` as it was. A writer killed between the two renames leaves no `path`; the next atomic_folder
    of `path` puts the old folder back first (remove_dead_writers). A symbolic link is followed: the
    folder it names is replaced."""
    path = Path(path).resolve() if replace else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers(path.parent, path.name)
    with writer_tag(path) as tag:
        tmp, aside = path.with_name(f".{path.name}.tmp-{tag}"), path.with_name(f".{path.name}.old-{tag}")
        tmp.mkdir()
        try:
            yield tmp
            if replace and path.is_dir():
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
                os.rename(path, aside)
            try:
                os.replace(tmp, path)
            except OSError:
                if not path.is_dir():
                    raise
            sync(path.parent)
        finally:
            if aside.is_dir() and not path.exists():  # stopped between the two renames: the old folder back
                os.rename(aside, path)
            shutil.rmtree(aside, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def writers_folder(path: str | Path) -> Iterator[Path]:
    """A new temporary folder `.<name>.tmp-<tag>` next to `path` (writer_tag), in which this process
    writes what becomes `path` (atomic_write_large's file; a graph export moves its files there); it is
    removed when the block ends. What writers of `path` that died left there is removed first
    (remove_dead_writers), what live ones write left alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers(path.parent, path.name)
    with writer_tag(path) as tag:
        tmp = path.with_name(f".{path.name}.tmp-{tag}")
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def writer_tag(path: Path) -> Iterator[str]:
    """A new tag `<host>-<pid>-<random>` for the temporary files and folders of this process's write of
    `path` (`.<name>.tmp-<tag>`, `.<name>.old-<tag>`), which no other writer's name takes (processes
    of other pid namespaces, e.g. containers sharing the host's name, may have this one's pid). For the
    block it holds an flock on the lock file `.<name>.tmp-<tag>.lock`, which the kernel releases when
    the process dies, however it dies: that is how a later writer tells that what it finds was left by
    a dead writer (remove_dead_writers). Make those files inside the block; remove them by its end."""
    tag = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    lock = path.with_name(f".{path.name}.tmp-{tag}.lock")
    handle = hold_lock(lock, refusal="", wait=True)
    try:
        yield tag
    finally:
        if handle is not None:
            lock.unlink(missing_ok=True)  # while held: the writer's files are gone, so it counts as dead
            handle.close()


def remove_dead_writers(folder: Path, name: str | None = None) -> bool:
    """Remove what writers on this host that died mid-write (SIGKILL, a power cut) left in `folder` (of
    `folder / name` only, given `name`): their temporary files and folders `.<name>.tmp-<tag>`, up to a
    model or a shard in size, and lock files. A folder one set aside to replace (`.<name>.old-<tag>`)
    is renamed back to `<name>` where that is missing, else removed. Those of live writers are left
    alone (writer_alive), and so are those of other hosts: a cache may be shared between machines, and
    some file systems lock per machine. Whether a live writer's lock was found: it may die before the
    folder changes again (atomic_write's folder_stamps)."""
    host = socket.gethostname()
    left = re.compile(rf"\.(.+)\.(?:tmp|old)-({re.escape(host)}-(\d+)(?:-[0-9a-f]{{8}})?)(?:\.lock)?")
    pattern = f".{glob.escape(name)}.*" if name is not None else ".*"
    writers = {m.group(1, 2, 3) for entry in folder.glob(pattern) if (m := left.fullmatch(entry.name))}
    locked = False
    for target, tag, pid in writers:
        lock = folder / f".{target}.tmp-{tag}.lock"
        with contextlib.ExitStack() as held:
            if writer_alive(lock, int(pid), held):
                locked = locked or lock.exists()  # not one judged by its pid (no lock), which may stay for long
                continue
            aside = folder / f".{target}.old-{tag}"
            if aside.is_dir() and not (folder / target).exists():
                os.rename(aside, folder / target)
            for entry in (aside, folder / f".{target}.tmp-{tag}", lock):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):  # as rmtree's: e.g. another user's, in a sticky folder
                        entry.unlink()
    return locked


def writer_alive(lock: Path, pid: int, held: contextlib.ExitStack) -> bool:
    """Whether the writer (of this host, process `pid`) whose lock file is `lock` (writer_tag) may still
    be writing: not when this process can take its flock without waiting, whatever pid namespace the
    writer ran in; the lock then stays held, in `held`, while the caller removes what it left. Where
    the lock cannot tell (no lock file: a writer without fcntl or of an older dinokit; a file system
    that does not lock), alive unless no process `pid` runs on this host."""
    try:
        import fcntl

        handle = held.enter_context(open(lock, "r+"))  # noqa: SIM115 (r+: never created here)
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except (ImportError, FileNotFoundError, PermissionError):
        pass
    except OSError as e:
        if e.errno not in LOCK_UNSUPPORTED:
            raise
    return process_alive(pid)


def link_entries(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Hard-link the files and folders of `old` whose names `keep` accepts into the folder `new` (copies
    where the file system refuses links): what a replacing atomic_folder carries over from the folder
    it replaces, at no cost in space or time. Nothing where `old` is not a folder."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if not keep(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry, new / entry.name)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A hard link `dst` to `src` (a symbolic link itself, not what it points to), else a copy."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


# os.kill(pid, 0) asks whether a process lives on POSIX only: on Windows signal 0 is CTRL_C_EVENT, which
# it would send to that process group
CAN_PROBE_PIDS = os.name == "posix"


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs; where that cannot be asked (Windows), True: a folder
    of a writer that may live is never removed."""
    if not CAN_PROBE_PIDS:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


LOCK_FILE = ".dinokit.lock"
# errors of flock from file systems that do not lock (some network and FUSE ones): no lock then
LOCK_UNSUPPORTED = {errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (creating it) for the block, so that two processes never
    write its files at once: with `wait` the second waits for the first, otherwise it gets a
    DinokitError saying that `what` is being written there. The lock is a `.dinokit.lock` file's flock,
    released when the process ends however it ends; a no-op without fcntl (Windows) or where the file
    system does not lock. A folder the lock created is removed again if the block fails before writing
    anything into it (a refused run leaves no empty folder behind)."""
    folder = Path(folder)
    lock = folder / LOCK_FILE
    created = False

    def make_folder() -> None:
        nonlocal created
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)

    refusal = f"another process is writing {what} in {folder}; wait for it to end, or choose another folder"
    handle = hold_lock(lock, refusal, wait, make_folder)
    with handle or contextlib.nullcontext():
        try:
            yield
        except BaseException:
            if handle is not None and created and os.listdir(folder) == [LOCK_FILE]:
                lock.unlink()
                folder.rmdir()
            raise


@contextlib.contextmanager
def file_lock(path: str | Path, what: str, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on writing the file `path` for the block, as folder_lock does for a
    folder: with `wait` a second writer of `path` waits, otherwise it gets a DinokitError saying that
    another process is `what` (e.g. "exporting to") `path`. The lock is the flock of a file
    `.<name>.lock` beside `path`, removed at the end of the block (a waiter that then holds the removed
    file locks afresh), so no lock file stays behind."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    refusal = f"another process is {what} {path}; wait for it to end, or choose another path"
    handle = hold_lock(lock, refusal, wait)
    if handle is None:
        yield
        return
    with handle:
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # while still held, so no other writer holds this file yet


def hold_lock(lock: Path, refusal: str, wait: bool, prepare: Callable[[], None] | None = None):
    """The open file `lock` (created if missing) with an exclusive flock on it, for folder_lock and
    file_lock; `prepare` (e.g. creating the folder) runs before each try. Without `wait` a lock that
    another process holds is a DinokitError saying `refusal`. None without fcntl (Windows); the
    unlocked file where the file system does not lock. A lock file that its holder removed while this
    one waited is locked afresh."""
    try:
        import fcntl
    except ImportError:
        return None
    while True:
        if prepare is not None:
            prepare()
        handle = open(lock, "a")  # noqa: SIM115 (held by the caller)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            raise DinokitError(refusal) from None
        except OSError as e:
            if e.errno not in LOCK_UNSUPPORTED:
                handle.close()
                raise
        if same_file(handle, lock):
            return handle
        handle.close()  # the holder we waited for removed its lock file: lock afresh


def same_file(handle, path: Path) -> bool:
    """Whether the open `handle` is still the file at `path` (not one removed or replaced since)."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False
