"""A training run's settings in its folder (pretrain and finetune alike): unknown keys refused with
the nearest valid ones, a new run refused where one exists, a resumed run held to its config.yaml."""

import difflib
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from dinokit import distributed as dist
from dinokit.errors import DinokitError
from dinokit.io import refuse_files_no_run_wrote
from dinokit.train.checkpoint import list_checkpoints


def refuse_unknown_keys(values: dict, known: Iterable[str], command: str, what: str) -> None:
    """A DinokitError naming each key of `values` not in `known`, with the nearest valid ones."""
    known = list(known)
    unknown = [k for k in values if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=3)
            hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise DinokitError(f"unknown {what} key(s): {', '.join(hints)}. `dinokit {command} --help` lists them.")


def read_saved_settings(saved: Path, facts: Iterable[str]) -> dict:
    """The key: value settings of a run's config.yaml, without the run `facts` it records beside them."""
    try:
        values = yaml.safe_load(saved.read_text())
    except yaml.YAMLError as e:
        values = e
    if not isinstance(values, dict):
        problem = f"is not valid YAML ({values})" if isinstance(values, Exception) else "holds no key: value mapping"
        raise DinokitError(
            f"resume=true reads the run's settings from {saved}, which {problem}; restore it (the newest "
            "checkpoint holds the same settings under 'config'), or start a new run in another out=..."
        )
    return {k: v for k, v in values.items() if k not in facts}


# What a pretrain or finetune run writes in its folder beside config.yaml (which it writes first): a new
# run into a folder holding them but no config.yaml would rewrite or remove the user's files
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "tensorboard",
    "backbone.safetensors",
    "bad_files.txt",
    "classifier.safetensors",
    "finetune.json",
)


def run_settings(
    out: Path,
    keys: dict,
    resume: bool,
    new: Callable[[dict], object],
    resolve: Callable[..., object],
    resumable: Callable[[object], Iterable[str]],
    facts: Iterable[str],
):
    """(The run's configuration, whether a checkpoint will be resumed). A new run (`new(keys)`) refuses
    a folder that already holds one, never overwriting a run; a resumed run takes its config.yaml
    (`resolve(values, check=False)`), and the given keys may change only `resumable(saved config)`."""
    saved = out / "config.yaml"
    refuse_files_no_run_wrote(out, RUN_FILES, (saved.name,), "dinokit pretrain / finetune")
    if not resume:
        if saved.exists():
            raise DinokitError(
                f"{out} already holds a run (config.yaml); pass resume=true to continue it, or choose a new out=..."
            )
        return new(keys), False
    if not saved.exists():
        if dist.launched_as_process_0():  # once, not once per torchrun process
            print(f"resume=true but {out} holds no run yet: starting a new one")
        return new(keys), False
    # checked with the keys given: a resumable key fixes a saved value that a later dinokit refuses
    old = resolve(read_saved_settings(saved, facts), check=False)
    given = resolve({**old.to_dict(), **keys})
    allowed = set(resumable(old))
    conflicts = [k for k in keys if k not in allowed and getattr(given, k) != getattr(old, k)]
    if conflicts:
        text = ", ".join(f"{k} (saved {getattr(old, k)!r}, given {getattr(given, k)!r})" for k in conflicts)
        raise DinokitError(f"resume=true continues the saved configuration, but {text} differ; start a new run instead")
    return given, bool(list_checkpoints(out / "checkpoints"))
