"""Training checkpoints: one file per save, written atomically, the newest few kept.

A checkpoint holds everything a run needs to continue exactly: model (student, teacher, heads,
centers), optimiser, the iteration, the position in the sample stream, the clock, every process's
RNG states and the run's counters. Model and optimiser states are full (unsharded, keyed by
parameter name), so a run can resume on a different number of processes, with DDP or FSDP.
Files are read with `torch.load(weights_only=True)`.
"""

import re
from pathlib import Path

import torch

from dinokit.errors import DinokitError
from dinokit.io import atomic_write

PATTERN = re.compile(r"checkpoint_(\d+)\.pt$")


def checkpoint_path(folder: str | Path, iteration: int) -> Path:
    return Path(folder) / f"checkpoint_{iteration:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files of a folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.search(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(folder: str | Path, iteration: int, state: dict, keep: int = 3) -> Path:
    """Write `state` as checkpoint_<iteration>.pt (temp file + rename) and delete all but the newest
    `keep` checkpoints (keep <= 0 keeps all), and the temporary files of saves that were killed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, iteration)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    # a process killed while saving leaves its temporary file, a whole checkpoint in size; one run at a
    # time writes a folder (pretrain's folder lock), so any such file here is stale
    for stale in folder.glob(".checkpoint_*.pt.tmp*"):
        stale.unlink(missing_ok=True)
    if keep > 0:
        for old in list_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise DinokitError(
            f"checkpoint {path} could not be read ({e}); delete it to resume from the previous one"
        ) from None
