"""Training checkpoints: one file per save, written atomically, the newest few kept.

A checkpoint holds everything a run needs to continue exactly: model (student, teacher, heads,
centers), optimiser, the iteration, the position in the sample stream, the clock, every process's
RNG states and the run's counters. Model and optimiser states are full (unsharded, keyed by
parameter name), so a run can resume on a different number of processes, with DDP or FSDP.
Files are read with `torch.load(weights_only=True)`. Also here: another run's newest checkpoint as a
run starts from it (continue_from=, distill_from=), and a run's backbone exported for `load_model`.
"""

import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dinokit import distributed as dist
from dinokit.errors import DinokitError
from dinokit.io import atomic_write
from dinokit.models.loading import export_model, load_model, pickled_objects_error
from dinokit.models.vision_transformer import VisionTransformer, ViTConfig
from dinokit.train.self_distillation import SelfDistillation

PATTERN = re.compile(r"checkpoint_(\d+)\.pt")  # the whole name (fullmatch): a copy named best_checkpoint_... is not one


def checkpoint_path(folder: str | Path, iteration: int) -> Path:
    return Path(folder) / f"checkpoint_{iteration:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files of a folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.fullmatch(p.name))]
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


def load_checkpoint(path: str | Path, fix: str = "delete it to resume from the previous one") -> dict:
    """A checkpoint's state, read with weights_only; one that cannot be read is a DinokitError saying
    `fix` (the default: a resumed run's own newest checkpoint), one that pickles Python objects is
    refused (loading.pickled_objects_error)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise pickled_objects_error(path, e) from None
    except Exception as e:
        raise DinokitError(f"checkpoint {path} could not be read ({e}); {fix}") from None


# ---------------------------------------------------------------------------------- what a checkpoint holds
def model_state(model: SelfDistillation, fsdp: bool) -> dict:
    """The full model state on the CPU (students, teachers, heads, centers), keyed by parameter name;
    under FSDP gathered from the shards (a collective of every process)."""
    if not fsdp:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: SelfDistillation, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """The student's full optimiser state, keyed by parameter name (on the CPU under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=fsdp)
    return get_optimizer_state_dict(model.student, optimizer, options=options)


def load_optimizer_state(model: SelfDistillation, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A full optimiser state (keyed by parameter name) into a plain, DDP or FSDP2 student's optimiser."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model.student, optimizer, state, options=StateDictOptions(full_state_dict=True))


def rng_state(device: torch.device) -> dict:
    """This process's random number generators: {"cpu": ..., "cuda": ... (on a GPU)}."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore `rng_state`'s generators."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------- the trained backbone
def export_trained_backbone(config: ViTConfig, state: dict[str, torch.Tensor], path: str | Path) -> str:
    """A run's backbone (`config`, weights `state`) as dinokit safetensors at `path`: fp32, eval mode,
    without the stochastic depth it trained with; returns the path."""
    backbone = VisionTransformer(replace(config, drop_path_rate=0.0))
    backbone.load_state_dict(state)
    return export_model(backbone.float().eval(), path, format="dinokit")


def export_teacher_backbone(model: SelfDistillation, path: Path, fsdp_state: dict | None) -> str | None:
    """Write the teacher backbone as dinokit safetensors (rank 0); returns the path there. fsdp_state:
    under FSDP, the model's full state (`model_state`, a collective of every process), else None."""
    if not dist.is_main_process():
        return None
    teacher = model.teacher.backbone
    state = teacher.state_dict()
    if fsdp_state is not None:
        prefix = "teacher.backbone."
        state = {k[len(prefix) :]: v for k, v in fsdp_state.items() if k.startswith(prefix)}
    return export_trained_backbone(teacher.config, state, path)


# ---------------------------------------------------------------------------------- another run's state
# What a run's objective and heads are: a run that starts from another's heads (continue_from=) or
# learns in its teacher's prototype space (distill_from=) takes these from it.
OBJECTIVE_KEYS = (
    "objective",
    "head_prototypes",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "head_nlayers",
    "head_norm_last_layer",
    "ibot_separate_head",
    "ibot_prototypes",
    "ibot_hidden_dim",
    "ibot_bottleneck_dim",
    "ibot_loss_weight",
)


@dataclass
class RunState:
    """A (finished or stopped) run's newest checkpoint, as another run starts from it."""

    source: Path  # the checkpoint read
    config: dict  # the run's PretrainConfig as a dict
    backbone_config: dict | None  # ViTConfig.to_dict() of its backbone (None: a checkpoint from before 2026-11-27)
    state: dict[str, torch.Tensor]  # its model state: student.*, teacher.*, *_center.*

    def vit_config(self) -> ViTConfig:
        """The backbone's architecture: as saved, or (older checkpoints) read from the weights."""
        if self.backbone_config is not None:
            return ViTConfig(**self.backbone_config)
        return replace(load_model(self.source).config, mask_token="teacher.backbone.mask_token" in self.state)


def read_run(source: str | Path, key: str) -> RunState:
    """The newest checkpoint of a run folder, or the checkpoint file `source`, given as `key`=."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = list_checkpoints(path / "checkpoints")
        if not found:
            raise DinokitError(
                f"{key}={source} holds no checkpoints/ (a `dinokit pretrain` run folder keeps them there; run "
                "with checkpoint_every=... or let the run end, which saves one)"
            )
        path = found[-1]
    elif not path.exists():
        raise DinokitError(f"{key}={source} not found (a `dinokit pretrain` run folder or one of its checkpoints)")
    elif path.suffix != ".pt":
        raise DinokitError(
            f"{key}={source} is not a dinokit pretraining run: it needs the run's heads, which a backbone file has "
            "none of. Train heads for it first: `dinokit pretrain init=<its weights> freeze_backbone=1.0 ...` "
            f"(the backbone frozen), then pass that run folder as {key}="
        )
    # never "delete it": a checkpoint of the run read from, maybe its only one
    checkpoint = load_checkpoint(path, f"pass another checkpoint of that run as {key}= (its checkpoints/ folder)")
    missing = [k for k in ("config", "model") if k not in checkpoint]
    if missing:
        raise DinokitError(f"{path} is not a dinokit pretraining checkpoint (no {', '.join(missing)})")
    if not any(k.startswith("teacher.") for k in checkpoint["model"]):  # e.g. a `dinokit finetune` run's
        backbone = path.parent.parent / "backbone.safetensors"
        weights = str(backbone) if backbone.is_file() else "<its weights>"
        raise DinokitError(
            f"{key}={source} is not a dinokit pretraining run ({path} holds no teacher nor DINO heads: a "
            f"`dinokit finetune` run's backbone and classifier?). Start a pretraining run from its backbone with "
            f"`dinokit pretrain init={weights} ...`"
            + (
                ""
                if key == "continue_from"
                else f" (freeze_backbone=1.0 trains heads for it), then pass that run as {key}="
            )
        )
    return RunState(path, checkpoint["config"], checkpoint.get("backbone_config"), checkpoint["model"])


def settings_from_run(cfg, run: RunState, **fixed) -> tuple[object, list[str]]:
    """`cfg` (a PretrainConfig) with `run`'s OBJECTIVE_KEYS and the `fixed` values; and a note per value
    that changed."""
    values = {key: run.config[key] for key in OBJECTIVE_KEYS if key in run.config} | fixed
    notes = [f"{k}={getattr(cfg, k)!r} -> {v!r}" for k, v in values.items() if getattr(cfg, k) != v]
    return replace(cfg, **values), notes
