"""Kill-and-resume: long-running commands stopped partway (SIGKILL, Ctrl-C) leave nothing a later run
reads as complete, and the same command run again finishes as an uninterrupted run would."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_killed(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a Python `script` in a fresh process that SIGKILLs itself partway; its result (-9)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    assert done.returncode == -9, done.stderr  # killed where the script says, not failed before
    return done


# ------------------------------------------------------------------------------------ downloads
@pytest.mark.parametrize("where", ["mid-download", "checking the download"])
def test_a_download_killed_partway_leaves_no_file_in_the_cache_after_the_next_one(where, tmp_path, monkeypatch):
    """torch.hub writes a download to a temporary `<dst>.<uuid>.partial` beside it and dinokit's atomic
    write to `.<name>.tmp<pid>`, both in the cache folder: a download killed partway (SIGKILL, a closed
    laptop) left them there for good, up to a whole model in size, and every later download that was
    killed added one. The next download of the name now removes what a killed one left (never a live
    one's), and caches the whole file."""
    from dinokit.models import hub

    served = tmp_path / "served" / "dinov2_vits14_pretrain.pth"
    served.parent.mkdir()
    torch.save({"w": torch.arange(100_000.0)}, served)  # over torch.hub's 128 KB chunk: killed mid-file
    cache = tmp_path / "cache"
    kill = "os.kill(os.getpid(), signal.SIGKILL)"
    patch = (
        f"torch.hub.tqdm = type('Killed', (), {{'__init__': lambda s, **k: None, '__enter__': lambda s: s, "
        f"'__exit__': lambda s, *a: None, 'update': lambda s, n: {kill}}})"
        if where == "mid-download"
        else f"hub.check_whole_archive = lambda path, url: {kill}"
    )
    run_killed(
        f"""
        import os, signal
        import torch.hub
        from dinokit.models import hub
        hub.official_url = lambda name: {served.as_uri()!r}
        {patch}
        hub.resolve("dinov2_vits14")
        """,
        env={"DINOKIT_CACHE": str(cache)},
    )
    assert not (cache / served.name).exists()  # never cached as if complete
    assert [p.name for p in cache.iterdir()]  # what the killed download left

    monkeypatch.setenv("DINOKIT_CACHE", str(cache))
    monkeypatch.setattr(hub, "official_url", lambda name: served.as_uri())
    assert hub.resolve("dinov2_vits14") == cache / served.name
    assert sorted(p.name for p in cache.iterdir()) == [served.name]
    assert (cache / served.name).read_bytes() == served.read_bytes()
