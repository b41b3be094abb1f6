import errno
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dinokit import io
from dinokit.errors import DinokitError
from dinokit.io import atomic_write, sync
from tests.conftest import dead_writer_tag, leftover_writer_folders


def refuse_fsync(monkeypatch, code: int, folders_only: bool = True) -> None:
    """os.fsync as on a file system that fails with `code` (on folders only, or on everything)."""
    real = os.fsync

    def fsync(fd):
        if folders_only and not stat.S_ISDIR(os.fstat(fd).st_mode):
            return real(fd)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(io.os, "fsync", fsync)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_a_file_system_that_refuses_to_sync_folders_still_gets_atomic_writes(tmp_path, monkeypatch, code):
    refuse_fsync(monkeypatch, code)
    atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("done"))
    assert (tmp_path / "a.txt").read_text() == "done"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_other_sync_errors_are_not_hidden(tmp_path, monkeypatch):
    refuse_fsync(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as failed:
        sync(tmp_path)
    assert failed.value.errno == errno.EIO
    (tmp_path / "f").write_text("x")
    refuse_fsync(monkeypatch, errno.EINVAL, folders_only=False)
    with pytest.raises(OSError) as failed:  # a file that cannot be synced may be lost: still an error
        sync(tmp_path / "f")
    assert failed.value.errno == errno.EINVAL


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_atomic_write_gives_new_files_the_umask_mode_and_keeps_an_existing_files_mode(tmp_path):
    """safetensors >= 0.8 writes 0600 files (a temp file renamed into place): an exported model or a run's
    backbone.safetensors was unreadable to other users, unlike every other file dinokit writes."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "m.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, tmp))
        assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o644
        os.chmod(tmp_path / "m.safetensors", 0o640)
        atomic_write(tmp_path / "m.safetensors", lambda tmp: save_file({"w": torch.ones(2)}, tmp))
        assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o640
    finally:
        os.umask(old)


def test_a_full_disk_is_an_os_error_naming_the_file_whatever_the_writer_raises(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError("... unexpected pos ..."), safetensors a
    SafetensorError: a traceback where `dinokit` prints one line for an OSError."""
    import shutil

    from dinokit.cli import describe_os_error

    def torch_save_on_a_full_disk(tmp):
        Path(tmp).write_bytes(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    real_usage = shutil.disk_usage
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=4096))
    with pytest.raises(OSError) as failed:
        atomic_write(tmp_path / "checkpoint.pt", torch_save_on_a_full_disk)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(tmp_path / "checkpoint.pt")
    assert describe_os_error(failed.value).startswith(f"No space left on device ({tmp_path / 'checkpoint.pt'}): free")
    assert os.listdir(tmp_path) == []  # the unfinished file was removed
    monkeypatch.setattr(io.shutil, "disk_usage", real_usage)  # space left: the writer's own error
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(tmp_path / "checkpoint.pt", torch_save_on_a_full_disk)


def test_a_folder_the_lock_made_is_removed_when_the_block_fails_before_writing_into_it(tmp_path):
    """A refused pretraining run (a bad key) or index build (a bad option) left an empty out= folder
    holding only .dinokit.lock."""
    made = tmp_path / "new"
    with pytest.raises(ValueError), io.folder_lock(made, "a test"):
        raise ValueError("refused")
    assert not made.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    wrote = tmp_path / "wrote"
    for folder in (existing, wrote):
        with pytest.raises(ValueError), io.folder_lock(folder, "a test"):
            (folder / "result.txt").write_text("kept") if folder == wrote else None
            raise ValueError("refused")
        assert folder.is_dir()  # it was there before, or holds work
    assert (wrote / "result.txt").read_text() == "kept"


def test_a_waiter_locks_afresh_when_the_holder_removes_its_empty_folder(tmp_path):
    import threading
    import time

    folder = tmp_path / "index"
    holding, waited = threading.Event(), []

    def second():
        holding.wait()
        with io.folder_lock(folder, "an index"):  # blocks until the first fails and removes the folder
            (folder / "index.faiss").write_text("second")
            with open(folder / io.LOCK_FILE) as handle:
                waited.append(io.same_file(handle, folder / io.LOCK_FILE))

    thread = threading.Thread(target=second)
    thread.start()
    with pytest.raises(ValueError), io.folder_lock(folder, "an index"):
        holding.set()
        time.sleep(0.3)  # the second is now waiting on this lock file
        raise ValueError("refused")
    thread.join(10)
    assert waited == [True] and (folder / "index.faiss").read_text() == "second"


def test_the_umask_is_read_without_being_changed(monkeypatch):
    """file_mode learned the umask by setting it to 0 and back: a file another thread created in that
    instant got mode 0666."""
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the umask was set to read it"))
        assert io.process_umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_a_writer_killed_mid_folder_leaves_no_temporary_folder_after_the_next_write(tmp_path):
    """eval's feature cache: a job killed while it wrote a shard left its .shard-NNNNN.tmp<pid> folder
    (a whole shard in size) for good."""
    left = leftover_writer_folders(tmp_path, "shard-00000", "features.npy")
    with io.atomic_folder(tmp_path / "shard-00000") as tmp:
        (tmp / "rows.json").write_text("[]")
    assert (tmp_path / "shard-00000" / "rows.json").exists()
    assert not left["dead writer here"].exists()
    assert left["live writer here"].exists() and left["another host's"].exists()


def test_a_folder_replaced_whole_is_never_a_mix_and_a_writer_killed_mid_swap_is_undone(tmp_path):
    """atomic_folder(replace=True) (export format=hf): a failed writer leaves the old folder as it was;
    one killed after renaming the old folder aside, before renaming the new one in, leaves no folder,
    and the next writer puts the old one back before it starts."""

    def files(folder: Path) -> dict[str, str]:
        return {p.name: p.read_text() for p in folder.iterdir()}

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("old config")
    (folder / "weights").write_text("old weights")
    with pytest.raises(KeyboardInterrupt), io.atomic_folder(folder, replace=True) as tmp:
        (tmp / "weights").write_text("new weights")
        raise KeyboardInterrupt
    assert files(folder) == {"config.json": "old config", "weights": "old weights"}
    assert os.listdir(tmp_path) == ["export"]
    folder.rename(tmp_path / f".export.old-{dead_writer_tag()}")  # killed mid-swap
    with pytest.raises(KeyboardInterrupt), io.atomic_folder(folder, replace=True):
        raise KeyboardInterrupt
    assert files(folder) == {"config.json": "old config", "weights": "old weights"}
    assert os.listdir(tmp_path) == ["export"]
    with io.atomic_folder(folder, replace=True) as tmp:
        (tmp / "weights").write_text("new weights")
    assert files(folder) == {"weights": "new weights"} and os.listdir(tmp_path) == ["export"]


def test_a_replacing_writer_stopped_between_its_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    """An error raised in the swap itself, after the old folder was renamed aside and before the new one
    was renamed in, left no folder at all (the aside folder was removed with the temporary one). The
    old folder is now put back. A finished swap gives the new folder the old one's permission bits,
    and through a symbolic link replaces the folder it names."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "weights").write_text("old weights")
    os.chmod(folder, 0o750)
    real_replace = os.replace

    def stopped(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt), io.atomic_folder(folder, replace=True) as tmp:
        (tmp / "weights").write_text("new weights")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (folder / "weights").read_text() == "old weights" and os.listdir(tmp_path) == ["export"]
    link = tmp_path / "link"
    link.symlink_to(folder)
    with io.atomic_folder(link, replace=True) as tmp:
        (tmp / "weights").write_text("new weights")
    assert link.is_symlink() and (folder / "weights").read_text() == "new weights"
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o750 and sorted(os.listdir(tmp_path)) == ["export", "link"]


@pytest.mark.parametrize("links", [True, False])
def test_link_entries_carries_the_kept_files_and_folders_over_as_links_or_else_copies(tmp_path, monkeypatch, links):
    """What a replacing atomic_folder keeps of the folder it replaces: hard links (no space, no time),
    copies on a file system that refuses them; subfolders whole, symbolic links as links."""
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "sub").mkdir(parents=True)
    (old / "README.md").write_text("card")
    (old / "sub" / "notes.txt").write_text("notes")
    (old / "weights.bin").write_text("stale")
    (old / "card").symlink_to("README.md")
    new.mkdir()
    if not links:

        def refuse(*args, **kwargs):
            raise OSError(errno.EPERM, "no hard links here")

        monkeypatch.setattr(io.os, "link", refuse)
    io.link_entries(old, new, keep=lambda name: name != "weights.bin")
    assert sorted(str(p.relative_to(new)) for p in new.rglob("*")) == ["README.md", "card", "sub", "sub/notes.txt"]
    assert (new / "sub" / "notes.txt").read_text() == "notes" and os.readlink(new / "card") == "README.md"
    for name in ("README.md", "sub/notes.txt"):
        assert os.path.samefile(old / name, new / name) == links
    io.link_entries(tmp_path / "missing", new, keep=lambda name: True)  # no earlier folder: nothing


def test_a_file_lock_refuses_or_waits_for_a_second_writer_and_leaves_no_lock_file(tmp_path):
    import threading

    target = tmp_path / "model.onnx"
    order = []

    def second():
        with io.file_lock(target, "exporting to"):  # waits for the first
            order.append("second")

    with io.file_lock(target, "exporting to", wait=False):
        refused = pytest.raises(DinokitError, match=f"another process is exporting to {target}; wait for it")
        with refused, io.file_lock(target, "exporting to", wait=False):
            pass
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.3)
        order.append("first")
    waiter.join(10)
    assert order == ["first", "second"] and os.listdir(tmp_path) == []


def test_where_pids_cannot_be_probed_every_writer_counts_as_alive(tmp_path, monkeypatch):
    """On Windows os.kill(pid, 0) sends CTRL_C_EVENT to the process group `pid` (and raises a plain
    OSError for a dead one): process_alive must not call it there, and no writer's folder is removed."""
    monkeypatch.setattr(io, "CAN_PROBE_PIDS", False)
    monkeypatch.setattr(os, "kill", lambda *args: pytest.fail("os.kill called"))
    assert io.process_alive(int(dead_writer_tag().rsplit("-", 1)[1]))
    left = leftover_writer_folders(tmp_path, "shard-00000", "features.npy")
    with io.atomic_folder(tmp_path / "shard-00000") as tmp:
        (tmp / "rows.json").write_text("[]")
    assert all(folder.exists() for folder in left.values())


def test_an_eval_video_folder_is_refused_by_the_other_commands(tmp_path):
    """`dinokit eval video` refused other commands' folders, but its video.json was no output marker,
    so e.g. eval knn wrote its files into an eval video folder without a word."""
    (tmp_path / "video.json").write_text("{}")
    with pytest.raises(DinokitError, match=r"eval video results \(video.json\)"):
        io.refuse_other_outputs(tmp_path, ("knn.json", "linear.json"), "dinokit eval")
    io.refuse_other_outputs(tmp_path, ("video.json",), "dinokit eval video")


def hold_writer_lock(folder: Path, name: str, tag: str) -> subprocess.Popen:
    """A live process holding the lock of a writer of `folder / name` tagged `tag` (as io.writer_tag
    does), until it is killed or its stdin closes: a writer of another pid namespace, as far as this
    process can tell."""
    lock = folder / f".{name}.tmp-{tag}.lock"
    hold = "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True)"
    writer = subprocess.Popen(
        [sys.executable, "-c", f"{hold}; sys.stdin.read()", str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert writer.stdout.readline() == b"held\n"
    return writer


@pytest.mark.skipif(os.name != "posix", reason="flock")
@pytest.mark.parametrize("pid", ["this process's", "one that ended here", "this process's, and a random part"])
def test_a_live_writer_of_another_pid_namespace_keeps_its_folder_until_it_is_killed(tmp_path, pid):
    """Containers sharing the host's name (docker --net=host) each have their own pids, often 1: a writer's
    folder `.<name>.tmp-<host>-<pid>` counted as dead where its pid was this process's or was not alive
    here, and was removed mid-write. Its writer's lock (flock) now tells, whatever the pid (and names now
    end in a random part, as the last case's)."""
    number = int(dead_writer_tag().rsplit("-", 1)[1]) if pid == "one that ended here" else os.getpid()
    tag = f"{socket.gethostname()}-{number}" + (f"-{secrets.token_hex(4)}" if "random" in pid else "")
    left = tmp_path / f".shard.tmp-{tag}"
    left.mkdir()
    (left / "features.npy").write_bytes(b"half")
    writer = hold_writer_lock(tmp_path, "shard", tag)
    try:
        with io.atomic_folder(tmp_path / "shard") as tmp:
            (tmp / "rows.json").write_text("[]")
        assert (left / "features.npy").read_bytes() == b"half"
    finally:
        writer.kill()
        writer.wait()
    with io.writers_folder(tmp_path / "shard"):  # the writer is dead now: what it left goes first
        assert not left.exists()
    assert os.listdir(tmp_path) == ["shard"]


def test_two_writers_of_one_path_at_once_get_folders_of_their_own(tmp_path):
    """Two writers of one path in one process (or in two pid namespaces, with one pid) took the same
    folder name `.<name>.tmp-<host>-<pid>`: the second removed the first's folder as its dead pid's."""
    with io.writers_folder(tmp_path / "m.onnx") as first, io.writers_folder(tmp_path / "m.onnx") as second:
        assert first != second and first.is_dir() and second.is_dir()
    assert os.listdir(tmp_path) == []


WRITER = """
import os, signal, sys
from pathlib import Path
from dinokit.io import atomic_write

def write(tmp):
    Path(tmp).write_text("half")
    print("writing", flush=True)
    if sys.argv[2] == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()

atomic_write(sys.argv[1], write)
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL, flock")
def test_the_next_atomic_write_removes_what_a_writer_killed_mid_write_left_not_a_live_ones(tmp_path):
    """A JSON result, PNG or metrics file whose writer was killed in the instant of writing left its
    hidden `.<name>.tmp<pid>` beside it for good. The next write there now removes it (also in a process
    that wrote there before), and never a live writer's, which goes once that writer is killed too."""
    target = tmp_path / "result.json"
    io.write_json(target, {"run": 1})
    writers = {}
    for how in ("live", "killed"):  # (a writer started after the kill would remove what it left)
        writers[how] = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), how], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert writers[how].stdout.readline() == b"writing\n"
    assert writers["killed"].wait() == -signal.SIGKILL
    live = writers["live"].pid
    try:
        assert len(os.listdir(tmp_path)) == 5  # result.json, and a temporary file and a lock file of each writer
        io.write_json(target, {"run": 2})
        live_files = sorted(p.name for p in tmp_path.glob(f".result.json.tmp-{socket.gethostname()}-{live}-*"))
        assert set(os.listdir(tmp_path)) == {"result.json", *live_files} and len(live_files) == 2
        assert (tmp_path / live_files[0]).read_text() == "half"  # its temporary file (and its .lock)
    finally:
        writers["live"].kill()
        writers["live"].wait()
    io.write_json(target, {"run": 3})
    assert os.listdir(tmp_path) == ["result.json"] and io.read_json(target) == {"run": 3}


def test_atomic_write_lists_the_folder_only_after_another_process_changed_it(tmp_path, monkeypatch):
    """Looking for dead writers' files lists the folder: at every write, that cost O(files there), 4 ms
    a write among 10,000 per-image outputs. A folder that only this process has written since its last
    look is not listed again."""
    io.write_json(tmp_path / "a.json", {})
    monkeypatch.setattr(io, "remove_dead_writers", lambda *args: pytest.fail("the folder was listed"))
    for i in range(3):
        io.write_json(tmp_path / f"{i}.json", {})
    monkeypatch.undo()
    subprocess.run([sys.executable, "-c", f"open({str(tmp_path / 'b.txt')!r}, 'w')"], check=True)
    listed = []
    monkeypatch.setattr(io, "remove_dead_writers", lambda folder, name=None: listed.append(folder) or False)
    io.write_json(tmp_path / "c.json", {})
    assert listed == [tmp_path]


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_replacing_writer_killed_between_its_renames_gets_the_old_folder_put_back_by_the_next(tmp_path):
    """The old folder, set aside as `.<name>.old-<tag>` by a writer that was killed before it renamed
    the new one in, comes back at the next atomic_folder of the path, now that its writer's lock tells
    that it is dead."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "weights").write_text("old weights")
    kill_at_the_second_rename = f"""
import os, signal
from dinokit import io
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
with io.atomic_folder({str(folder)!r}, replace=True) as tmp:
    (tmp / "weights").write_text("new weights")
"""
    assert subprocess.run([sys.executable, "-c", kill_at_the_second_rename]).returncode == -signal.SIGKILL
    assert not folder.exists() and len(os.listdir(tmp_path)) == 3  # the old folder aside, the new one, a lock
    with pytest.raises(KeyboardInterrupt), io.atomic_folder(folder, replace=True):
        raise KeyboardInterrupt
    assert (folder / "weights").read_text() == "old weights" and os.listdir(tmp_path) == ["export"]


def test_a_writer_judged_by_its_pid_alone_does_not_make_every_write_list_the_folder_again(tmp_path, monkeypatch):
    """Files without a lock whose pid runs (an older dinokit's; any, where pids cannot be probed) counted
    as a live writer's that might die any moment: every later write listed the folder again."""
    leftover_writer_folders(tmp_path, "result.json", "half")
    io.write_json(tmp_path / "result.json", {})
    monkeypatch.setattr(io, "remove_dead_writers", lambda *args: pytest.fail("the folder was listed"))
    io.write_json(tmp_path / "result.json", {})
