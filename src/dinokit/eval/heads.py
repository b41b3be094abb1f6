"""Head files: a probe's (or a fine-tuned classifier's) weights with what applying it needs.

One safetensors file per head: its tensors, and under the metadata key `dinokit_head` a JSON record
of the backbone it was trained on (`model`, its `weights_hash`), the input resolution, which blocks
feed it and its `task` ("segmentation", "depth" or "classification") with the task's own facts
(classes, ignore index, depth range, ...). `dinokit predict <task> head=FILE` reads it back, loads that
backbone (or `model=`) and refuses one whose weights differ from those the head was trained on.

The released DINOv2 ImageNet-1k linear heads (the official hub's `dinov2_vits14_lc` ... heads, a
plain .pth of `weight` (1000, (1 + n) D) and `bias`, n = 1 or 4 blocks) are read too
(`official_linear_head`): with the blocks, transform and ImageNet classes they were trained with.
"""

import json
import pickle
from pathlib import Path

import torch
import torch.nn as nn

from dinokit.errors import DinokitError
from dinokit.eval.common import Backbone, prepare_backbone
from dinokit.io import atomic_write
from dinokit.models.loading import pickled_objects_error

WRITERS = {  # which command writes each task's head file (named in errors)
    "segmentation": "dinokit eval segmentation",
    "depth": "dinokit eval depth",
    "classification": "dinokit eval linear (method=sgd or logreg) or dinokit finetune",
}


def head_metadata(backbone: Backbone, image_size: int, layers: tuple[int, ...], norm: bool, seed: int, **extra) -> dict:
    """What `predict` needs to rebuild a head's input: the backbone, resolution and blocks."""
    source = Path(backbone.source).expanduser()
    return {  # a local model as an absolute path, so that predict finds it from any working folder
        "model": str(source.resolve()) if source.exists() else backbone.source,
        "weights_hash": backbone.hash,
        "seed": seed,
        "image_size": image_size,
        "layers": list(layers),
        "norm": norm,
        "patch_size": backbone.model.patch_size,
        **extra,
    }


def save_head(path: Path, head: nn.Module | dict[str, torch.Tensor], metadata: dict) -> None:
    """Weights (a module's state dict, or the tensors themselves) as safetensors, with `metadata`."""
    from safetensors.torch import save_file

    tensors = head.state_dict() if isinstance(head, nn.Module) else head
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"dinokit_head": json.dumps(metadata)}))


def load_head_file(path: str | Path, task: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a head file; with `task`, a head of another task is refused."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    writer = WRITERS.get(task, "dinokit eval segmentation / depth / linear")
    if not path.is_file():
        raise DinokitError(f"head file not found: {path} ({writer} writes one into its out folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("dinokit_head")
        state = load_file(str(path))
        meta = None if meta is None else json.loads(meta)
    except (SafetensorError, OSError, ValueError) as e:  # json's JSONDecodeError is a ValueError
        raise DinokitError(
            f"{path} is not a readable head file (damaged or cut short? {e}): run {writer} again to write it"
        ) from None
    if not isinstance(meta, dict):
        raise DinokitError(f"{path} is not a dinokit head file (no dinokit_head metadata); {writer} writes one")
    if task is not None and meta.get("task") != task:
        other = meta.get("task")
        use = f"use `dinokit predict {other}` with it, or " if other in WRITERS else ""
        fix = f"{use}pass a {task} head ({writer} writes one)"
        raise DinokitError(f"{path} is a {other} head, not a {task} head: {fix}")
    return state, meta


def released_head_of(head: str | Path, task: str):
    """`hub.released_head(head)` (the parts of a released head's name) where it names a head of `task`, else
    None; a released head of another task is refused, naming its command. A file name that says neither a
    released backbone nor a dataset (my_linear_head.pth, nyu_linear4_head.pth) names no task: None."""
    from dinokit.models.hub import released_head

    name = released_head(head)
    if name is not None and name.task != task and name.backbone is None and name.dataset is None:
        return None  # only a classifier's ending (_linear_head): any task's own .pth may be named so
    if name is not None and name.task != task:
        raise DinokitError(
            f"{head} is a released DINOv2 {name.task} head, not a {task} head: use `dinokit predict {name.task} "
            f"head={head}`"
        )
    return name


def is_released_head(head: str | Path, task: str) -> bool:
    """Whether `dinokit predict <task>` reads `head` as a released DINOv2 head: a released name of that task
    (`released_head_of`) or a .pth / .pt file (dinokit's own head files are safetensors). An existing folder
    is an out folder holding a dinokit head file, whatever its name (out=out/dinov2_vits14_linear_head)."""
    path = Path(head).expanduser()
    if path.is_dir():
        return False
    return released_head_of(head, task) is not None or path.suffix in (".pth", ".pt")


def locate_released_head(head: str, model: str | None, task: str, example: str):
    """(local file, backbone to load, `released_head_of(head, task)`) of a released head of `task`: a released
    name (downloaded once into the cache) or a .pth file. model: the backbone; by default the released one
    the name says (a file named otherwise needs model=). example: a released name, for errors."""
    from dinokit.models.hub import RELEASED_HEADS, _download_url, released_head_url

    name = released_head_of(head, task)
    url = released_head_url(head) if name is not None else None
    if url is None and not Path(head).suffix and not Path(head).expanduser().exists():
        datasets, kinds = RELEASED_HEADS[task]
        middle = "[_reg]" if datasets == (None,) else "_{" + ",".join(datasets) + "}"
        raise DinokitError(
            f"no released DINOv2 {task} head is named {head}, and no such file exists: the released ones are "
            f"dinov2_vit{{s,b,l,g}}14{middle}_{{{','.join(kinds)}}}_head (e.g. {example}), or pass a head file"
        )
    path = _download_url(head, url, key="head") if url is not None and not Path(head).exists() else Path(head)
    model = model or (name.backbone if name is not None else None)
    if model is None:
        raise DinokitError(
            f"{head} is a .pth head whose name is not a released {task} head's: pass the backbone it was trained "
            f"on as model=... (e.g. model=dinov2_vits14 for {example}.pth)"
        )
    path = path.expanduser()
    if not path.is_file():
        raise DinokitError(f"head file not found: {path} (a released {task} head's name has no extension: {example})")
    return path, model, name


def official_linear_head(head: str, model: str | None, device: str) -> tuple[dict[str, torch.Tensor], dict, Backbone]:
    """(tensors, metadata as a head file's, backbone) of a released DINOv2 ImageNet-1k linear head,
    a released name (downloaded once) or its .pth. As the official `_LinearClassifierWrapper`: the
    input is the normed CLS of the last n blocks, then the mean of the last block's normed patch
    tokens, at 224 px (resize 256, centre crop); the 1000 classes are ImageNet-1k's in index order
    (torchvision's names). model: its backbone; by default the released backbone the name says."""
    from torchvision.models import ResNet50_Weights  # its meta holds the ImageNet-1k class names, in order

    path, model, name = locate_released_head(head, model, "classification", "dinov2_vits14_linear4_head")
    state = read_released_file(path)
    if isinstance(state, dict) and {"linear_head.weight", "linear_head.bias"} <= set(state):
        # the whole classifier's state dict (the hub's dinov2_vits14_lc ...): backbone.* and linear_head.*
        state = {"weight": state["linear_head.weight"], "bias": state["linear_head.bias"]}
    backbone = prepare_backbone(model, device, 0)
    check_released_backbone(head, model, backbone, name.backbone if name is not None else None)
    dim, depth = backbone.model.embed_dim, len(backbone.model.blocks)
    weight = state.get("weight") if isinstance(state, dict) else None
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    blocks = shape[1] // dim - 1 if shape is not None and len(shape) == 2 and shape[1] % dim == 0 else None
    if shape is None or set(state) != {"weight", "bias"} or shape[0] != 1000 or blocks not in (1, 4):
        keys = f"keys {sorted(map(str, state))[:5]}" if isinstance(state, dict) else f"a {type(state).__name__}"
        found = f"weight {shape}" if shape is not None else keys  # shape first: never set() / sorted() of a tensor
        raise DinokitError(
            f"{path} is not a DINOv2 linear head for model={model} (embed dim {dim}): a released head holds "
            f"weight (1000, 2 x {dim} or 5 x {dim}) and bias (1000,), this file {found}. Pass the backbone "
            "the head was released with as model=..., or a dinokit head file (eval linear / finetune)"
        )
    meta = {
        "task": "classification",
        "model": model,
        "weights_hash": backbone.hash,
        "image_size": 224,
        "resize_policy": "center_crop",
        "reduced_decode": False,  # the official transform decodes JPEGs whole
        "layers": list(range(depth - blocks, depth)),
        "norm": True,
        "n_last_blocks": blocks,
        "avgpool": True,
        "classes": list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"]),
        "official_head": str(path),
    }
    return state, meta, backbone


def read_released_file(path: Path, pickled: DinokitError | None = None):
    """What a released head's torch file holds, read with weights_only: one that pickles Python objects
    besides tensors is refused with `pickled` (default: loading.pickled_objects_error; torch's own message
    offers weights_only=False, not the fix here), a damaged one (cut short, not a torch file) too."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise (pickled or pickled_objects_error(path, e)) from None
    except Exception as e:
        raise DinokitError(f"{path} is not a readable weights file ({type(e).__name__}: {e})") from None


def read_released_dense_head(path: Path, task: str, example: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """({key without `decode_head.`: tensor}, the checkpoint's `meta` dict or None) of a released DINOv2
    segmentation or depth head: an mmcv checkpoint, its weights under "state_dict" where present (as mmcv's
    `load_checkpoint` reads it); other keys (a backbone's) are ignored. Read with weights_only: a file
    that also pickles other Python objects is refused, never unpickled. task names the head in errors
    ("segmentation", "depth"); example is one of its released names."""
    pickled = DinokitError(
        f"{path} holds Python objects besides its weights (e.g. an mmcv `meta` record), which dinokit does "
        "not unpickle (torch.load with weights_only=True refuses them). Where you trust the file, keep its "
        "weights alone and pass that file: "
        "python -c \"import torch; c = torch.load('IN.pth', weights_only=False); "
        "torch.save({'state_dict': c['state_dict']}, 'OUT.pth')\""
    )
    checkpoint = read_released_file(path, pickled)
    is_dict = isinstance(checkpoint, dict)
    state = checkpoint.get("state_dict", checkpoint) if is_dict else checkpoint
    meta = checkpoint.get("meta") if is_dict and isinstance(checkpoint.get("meta"), dict) else None
    keys = [k for k in state if isinstance(k, str)] if isinstance(state, dict) else []
    head = {k.removeprefix("decode_head."): state[k] for k in keys if k.startswith("decode_head.")}
    if not head or not all(isinstance(v, torch.Tensor) for v in head.values()):
        found = f"keys {sorted(keys)[:6]}" if isinstance(state, dict) else f"a {type(state).__name__}"
        classifier = {"weight", "bias"} <= set(keys)
        other = " (a classification head: use `dinokit predict classification`)" if classifier else ""
        raise DinokitError(
            f"{path} is not a DINOv2 {task} head: a released one holds decode_head.* weights under "
            f"state_dict, this file {found}{other}. Pass a released {task} head (such as {example}) or a head "
            f"file of `dinokit eval {task}`"
        )
    return head, meta


def check_released_backbone(head: str, model: str, backbone: Backbone, released: str | None) -> None:
    """A head whose name says its released backbone (`released`; None: nothing to check) is refused on a
    backbone of another shape: width, depth, patch or registers (a _reg head on a backbone without
    registers has the same width, and would give wrong classes without an error)."""
    from dinokit.models.architectures import get_config

    if released is None:
        return
    config, net = get_config(released), backbone.model
    wanted = (config.embed_dim, config.depth, config.patch_size, config.num_register_tokens)
    found = (net.embed_dim, len(net.blocks), net.patch_size, net.num_register_tokens)
    if found != wanted:
        raise DinokitError(
            f"{head} was released for {released} (width, depth, patch, registers {wanted}), but model={model} "
            f"has {found}: pass model={released} (or a copy of its weights file)"
        )


def head_inputs(backbone: Backbone, paths: list[Path], meta: dict, which: tuple[str, ...], transform, **loader):
    """`iter_features` of `paths` with the blocks and norm a head was trained on (`meta`): yields
    (indices into paths, {kind: features}, indices of unreadable files) per batch. loader: batch_size,
    num_workers, precision."""
    from dinokit.features.extract import iter_features

    return iter_features(backbone.model, paths, transform, which, meta["layers"], meta["norm"], **loader)


def backbone_for_head(meta: dict, model: str | None, device: str, head: Path | None = None) -> Backbone:
    """The backbone a head was trained on (from its metadata, or `model=`), checked by weights hash.
    head: the head file; a recorded local model no longer at its path but beside the head under its
    name (a fine-tuning run folder copied or moved whole) is read from there."""
    recorded = Path(meta["model"])
    beside = None if head is None else Path(head).parent / recorded.name
    if model is None and beside is not None and recorded.is_absolute() and not recorded.exists() and beside.exists():
        model = str(beside)
    try:
        backbone = prepare_backbone(model or meta["model"], device, meta.get("seed", 0))
    except DinokitError as e:
        if model is not None:
            raise
        raise DinokitError(f"the head's backbone {meta['model']} cannot be loaded ({e}); pass it as model=...") from e
    if backbone.hash != meta["weights_hash"]:
        raise DinokitError(
            f"the head was trained on features of {meta['model']} (weights hash {meta['weights_hash']}), "
            f"but model={model or meta['model']} has weights hash {backbone.hash}. Pass the backbone the "
            f"head was trained with as model=..."
        )
    return backbone
