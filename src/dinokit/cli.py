"""The `dinokit` command: `dinokit <command> key=value ...`.

Each command is a Python function; its keyword arguments are the command's keys, and the same keys can
come from a YAML file (`config=run.yaml`, explicit key=value pairs win). Values are parsed as YAML
scalars or lists (`true`, `3e-4`, `[1, 2]`) and converted to the function's annotated types.
"""

import ast
import atexit
import contextlib
import csv
import dataclasses
import difflib
import errno
import functools
import gc
import importlib
import inspect
import json
import os
import re
import sys
import types
import typing
from pathlib import Path

import yaml

from dinokit.errors import DinokitError, SharedError

# command words -> "module:function". The function is the Python API of the same name.
COMMANDS: dict[str, str] = {
    "models": "dinokit.models.commands:list_models",
    "info": "dinokit.models.commands:info",
    "export": "dinokit.models.commands:export",
    "demo": "dinokit.demo:demo",
    "eval knn": "dinokit.eval.classification:eval_knn",
    "eval linear": "dinokit.eval.classification:eval_linear",
    "eval segmentation": "dinokit.eval.segmentation:eval_segmentation",
    "eval depth": "dinokit.eval.depth:eval_depth",
    "eval video": "dinokit.eval.video:eval_video",
    "predict classification": "dinokit.eval.classification:predict_classification",
    "predict segmentation": "dinokit.eval.segmentation:predict_segmentation",
    "predict depth": "dinokit.eval.depth:predict_depth",
    "embed": "dinokit.features.embed:embed",
    "index build": "dinokit.retrieval.commands:build_index",
    "index search": "dinokit.retrieval.commands:index_search",
    "visualize attention": "dinokit.maps.commands:visualize_attention",
    "visualize pca": "dinokit.maps.commands:visualize_pca",
    "visualize similarity": "dinokit.maps.commands:visualize_similarity",
    "visualize matches": "dinokit.maps.commands:visualize_matches",
    "segment": "dinokit.maps.commands:segment",
    "track": "dinokit.maps.track_command:track",
    "curate dedup": "dinokit.curation.commands:dedup",
    "curate cluster": "dinokit.curation.commands:cluster",
    "curate sample": "dinokit.curation.commands:sample",
    "curate retrieve": "dinokit.curation.commands:retrieve",
    "pretrain": "dinokit.train.pretrain:pretrain",
    "finetune": "dinokit.train.finetune:finetune",
}

# command taking **keys -> the dataclass whose fields those keys are (listed by --help)
FURTHER_KEYS: dict[str, str] = {
    "pretrain": "dinokit.train.config:PretrainConfig",
    "finetune": "dinokit.train.finetune_config:FinetuneConfig",
}

# One-line meanings of keys that many commands share: `--help` shows one beside each such key that its
# command's docstring does not explain with a `key:` label of its own.
SHARED_KEYS: dict[str, str] = {
    "model": "weights file or folder, run folder, released name or HF id (eval / pictures: also random:<arch>)",
    "out": "where the results are written",
    "device": "auto (a GPU if there is one, else the CPU) | cpu | cuda | cuda:N | mps",
    "batch_size": "images per forward pass",
    "num_workers": "image-decoding worker processes (0: in the main process)",
    "precision": "bf16 (autocast) | fp32",
    "image_size": "input size in pixels (the short side with resize_policy=aspect), a multiple of the patch size",
    "resize_policy": "center_crop | resize (stretch); pictures: aspect (short side image_size, whole image) | resize",
    "reduced_decode": "decode large JPEGs at 1/2, 1/4 or 1/8 scale (false: whole, as the official code)",
    "seed": "random seed",
    "cache": "feature cache: auto ($DINOKIT_CACHE/features) | none | a folder",
    "progress": "show progress bars",
    "num_examples": "example images drawn into out",
    "epochs": "training epochs of the probe",
    "lr": "learning rate of the probe",
    "weight_decay": "weight decay of the probe",
    "train_batch_size": "images per training step of the probe",
    "image": "an image file",
    "k": "results per image",
}

# One-line meanings of the keys that a command's docstring mentions without a `key:` label (--help).
COMMAND_KEYS: dict[str, dict[str, str]] = {
    "demo": {
        "data": "a folder of your images instead of rendered shapes (<class>/ folders: k-NN per class)",
        "minutes": "training time (default: the preset's max_minutes)",
        "preset": "the pretraining preset",
    },
    "eval knn": {"few_shot_tries": "draws of each few_shot size (mean and std reported)"},
    "eval linear": {
        "train": "labelled <class>/<images> folder or path,label CSV",
        "selection_fraction": "share of each train class held out to choose the head (without selection=)",
        "n_last_blocks": "grid: CLS of the last 1 and / or 4 blocks",
        "avgpool": "grid: without and / or with the mean patch token",
        "learning_rates": "grid: the heads' learning rates",
        "logreg_values": "method=logreg: how many values of C, in 1e-6..1e5",
        "refit": "retrain the chosen head on all of train before val (with a held-out selection split)",
    },
    "eval segmentation": {
        "model": "required to train a probe: weights, run folder, name or random:<arch> (head=: the head's)",
        "train": "required to train a probe: images/ and masks/ (see above)",
        "val": "required: images/ and masks/ (see above)",
        "head": "score this saved or released head on val instead of training one",
        "scales": "head=: image scales averaged (default: the head's; ms heads 5 ratios)",
        "flip": "head=: also average the mirror images (default: the head's)",
    },
    "eval depth": {
        "model": "required to train a probe: weights, run folder, name or random:<arch> (head=: the head's)",
        "train": "required to train a probe: images/ and depth/ (see above)",
        "val": "required: images/ and depth/ (see above)",
        "head": "score this saved or released head on val instead of training one",
        "crop": "head=: evaluation crop: auto | eigen | garg | kb_garg | none",
    },
    "eval video": {
        "resolution": "the DAVIS folders' resolution: JPEGImages/<resolution>, Annotations/<resolution>",
        "image_size": "the frames' short side in pixels (see preprocessing)",
    },
    "predict depth": {"max_pixels": "an image with more pixels runs shrunk to them (none: all whole)"},
    "embed": {"layers": "blocks of the layers / layer_patch_tokens features, e.g. [8,9,10,11]"},
    "index build": {
        "nlist": "ivf cells (default 4 sqrt(N), at most N / 39)",
        "pq_m": "pq sub-vectors (default 16)",
        "pq_bits": "bits per pq sub-vector code (default 8)",
        "hnsw_m": "hnsw neighbours per node (default 32)",
    },
    "index search": {
        "nprobe": "ivf: cells visited (default ceil(sqrt(nlist))); more: closer to exact, slower",
        "ef_search": "hnsw: search effort; more: closer to exact, slower",
    },
    "visualize attention": {"mass": "share of each head's attention the thresholded maps hold (DINO: 0.6)"},
    "visualize pca": {"foreground_threshold": "mask the background: first component below it (e.g. 0.5; none: off)"},
    "visualize similarity": {"x": "pixel column in image", "y": "pixel row in image"},
    "visualize matches": {"other": "the second image"},
    "curate cluster": {
        "sample_size": "members each centroid is re-fitted on (default: half the average cluster size)",
        "strategy": "resampling members: closest to the centroid | random",
        "feature": "cls | patch_mean (must be in the embedding)",
    },
    "curate sample": {
        "clusters": "a `dinokit curate cluster` folder",
        "target_size": "images to select",
        "strategy": "random | closest: which images a level-1 cluster gives (at random, or nearest its centroid)",
    },
    "curate retrieve": {
        "pool": "an embed or index folder of the uncurated images (or clusters=)",
        "per_seed": "images each seed brings in",
        "min_score": "pool=: lowest cosine taken (default: none)",
        "feature": "cls | patch_mean (must be in the embedding)",
    },
    "pretrain": {
        "data": "a folder of images (recursive) or a text file of paths",
        "preset": "a shipped recipe (see above) or a YAML file; on a CPU: cpu32, cpu96 or demo",
        "max_iterations": "stop after this many iterations",
        "max_minutes": "stop after this many minutes of training",
        "resume": "continue the run in out from its newest checkpoint",
        "init": "start from weights load_model reads (released name, .pth, HF folder, ...), with fresh heads",
        "epochs": "real passes over the data (none: the preset's)",
        "batch_size": "images per process and step (none: the preset's)",
        "checkpoint_every": "iterations between checkpoints (0: off; none: the preset's)",
        "num_workers": "image-decoding worker processes per training process (none: the preset's)",
    },
    "finetune": {
        "model": "required (but with resume=true): as the eval commands' model=",
        "train": "required (but with resume=true): labelled folder or path,label CSV",
        "val": "required (but with resume=true): the reported split",
        "resume": "continue the run in out from its newest checkpoint",
    },
}

# The keys that lower a command's memory, as the out-of-memory message names them: sizes to lower, then
# settings to make (key: (value, note)). A command is told only the keys it has (`command_keys`).
MEMORY_SIZES = (
    "batch_size",
    "train_batch_size",
    "image_size",
    "max_pixels",
    "global_crops_size",
    "local_crops_size",
    "local_crops_number",
)
MEMORY_SETTINGS = {
    "precision": ("bf16", ""),
    "activation_checkpointing": ("true", ""),
    "fsdp": ("true", " (torchrun: the model sharded over the GPUs)"),
}

# a hint after the one-line message of an OSError, by errno
OS_ERROR_HINTS = {
    errno.EEXIST: "a file is where a folder is to be written: pass another path, or remove the file",
    errno.ENOTDIR: "a file is where a folder is expected: pass another path",
    errno.EISDIR: "a folder is where a file is to be written: pass a file path, or remove the folder",
    errno.ENOSPC: "free some space there (the unfinished file was removed), or write elsewhere",
}


def resolve_command(name: str):
    module, func = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), func)


def parse_value(text: str, annotation) -> object:
    """Convert a command-line string to the annotated type (YAML syntax for scalars and lists)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.strip().lower() in ("none", "null", "~") and len(options) < len(typing.get_args(annotation)):
            return None
        errors = []
        for option in options:
            try:
                return parse_value(text, option)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        none = " (or none)" if len(options) < len(typing.get_args(annotation)) else ""  # int | None: say so
        raise ValueError("; ".join(dict.fromkeys(errors)) + none)  # int | list[int]: one "expected a number"
    if annotation in (str, Path, inspect.Parameter.empty) or annotation is typing.Any:
        return text if annotation is not Path else Path(text)
    if origin in (list, tuple) or annotation in (list, tuple):
        args = typing.get_args(annotation)
        inner = args[0] if args else str
        converted = [parse_value(str(v) if not isinstance(v, str) else v, inner) for v in list_items(text)]
        return tuple(converted) if (origin or annotation) is tuple else converted
    if annotation in (int, float):
        try:
            number = float(text)  # also takes 3e-4, which YAML 1.1 reads as a string
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if annotation is int and not number.is_integer():
            raise ValueError(f"expected an integer, got {text!r}")
        return annotation(number)
    value = yaml.safe_load(text)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
        raise ValueError(f"expected true/false, got {text!r}")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {text!r}")
        return text
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping like {{a: 1}}, got {text!r}")
        return value
    return value


def list_items(text: str) -> list:
    """The items of a list key's value: a YAML list (`[a, 'b,c']`), one quoted YAML scalar (`'b,c'`:
    one item), the path of an existing file or folder (`lr=1e-3,bs=64/m.png`: one item, commas and all,
    as a list file's line), or else comma-separated items (`"b,c", d`: double quotes hold commas), not
    parsed as YAML, so that `*.jpg,b.jpg` or `@x` are items too."""
    if "," in text and os.path.exists(os.path.expanduser(text.strip())):
        return [text.strip()]
    if text.strip().startswith("["):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(
                f"{text!r} is not a YAML list ({e.problem}); write a list as [a, b], with items holding commas "
                "quoted: \"['a,b', c]\""
            ) from None
        if isinstance(value, list):
            return value
    if text.strip()[:1] in ("'", '"'):
        with contextlib.suppress(yaml.YAMLError):
            value = yaml.safe_load(text)
            if isinstance(value, str):
                return [value]
    # CSV cells: a,b or "a,b", c (double quotes hold commas)
    return [item.strip() for item in next(csv.reader([text], skipinitialspace=True), []) if item.strip()]


def convert_value(value: object, annotation) -> object:
    """A value from a YAML file, converted as the same value written on the command line would be
    (`parse_value`: `7e-2` for a float, `"32"` for an int, a scalar for a list key). Keys without an
    annotation (pretrain's further keys) are converted by the pretraining config instead."""
    if annotation is inspect.Parameter.empty or annotation is typing.Any:
        return value
    if isinstance(value, os.PathLike):  # a pathlib.Path from Python: the path as the command line gives it
        value = os.fspath(value)
    if isinstance(value, str):
        return parse_value(value, annotation)
    if isinstance(value, (list, dict)) and annotation in (str, Path):
        raise ValueError(f"expected a single value, got {value!r}")
    return parse_value(json.dumps(value), annotation)  # JSON is YAML: lists, numbers, true, null


def build_kwargs(func, pairs: list[str], command: str = "<command>") -> dict:
    """key=value strings (plus an optional config=FILE.yaml) -> validated keyword arguments; `command`
    names the command in the messages."""
    signature = inspect.signature(func)
    hints = typing.get_type_hints(func)
    params = {n: p for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepts_extra = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    raw: dict[str, object] = {}
    explicit: dict[str, str] = {}
    for n, pair in enumerate(pairs):
        if "=" not in pair:
            before = pairs[n - 1] if n and "=" in pairs[n - 1] and pair.replace("-", "_") not in params else None
            hint = (  # `data=My Photos/` unquoted: the shell split the path at its space
                f"; if it is the rest of a path with a space, quote the whole value: {before.split('=', 1)[0]}="
                f'"{before.split("=", 1)[1]} {pair}"'
                if before
                else ""
            )
            raise DinokitError(f"expected key=value, got {pair!r}{hint} (see `dinokit {command} --help`)")
        key, text = pair.split("=", 1)
        explicit[key.strip().replace("-", "_")] = text
    if "config" in explicit and "config" not in params:
        config_file = Path(explicit.pop("config"))
        if not config_file.is_file():
            raise DinokitError(f"config file not found: {config_file}")
        loaded = yaml.safe_load(config_file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise DinokitError(f"{config_file} must hold a mapping of key: value")
        raw.update(loaded)
    kwargs: dict[str, object] = {}
    for key in [*raw, *explicit]:
        if key not in params and not accepts_extra:
            close = difflib.get_close_matches(key, params, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise DinokitError(f"unknown key {key!r}.{hint} Valid keys: {', '.join(params)}")
    for key, value in raw.items():
        try:
            kwargs[key] = convert_value(value, hints.get(key, inspect.Parameter.empty))
        except (ValueError, TypeError, yaml.YAMLError) as e:
            raise DinokitError(f"bad value for {key} in {config_file}: {e}") from None
    for key, text in explicit.items():
        annotation = hints.get(key, inspect.Parameter.empty)
        try:
            kwargs[key] = parse_value(text, annotation)
        except (ValueError, TypeError, yaml.YAMLError) as e:
            raise DinokitError(f"bad value for {key}: {e}") from None
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise DinokitError(
            f"missing required key(s): {', '.join(f'{m}=...' for m in missing)} "
            f"(`dinokit {command} --help` says what each key is)"
        )
    return kwargs


def type_name(annotation) -> str:
    """`int`, `float | None`, `list[int]`: an annotation as --help shows it."""
    if annotation is inspect.Parameter.empty:
        return ""
    if typing.get_args(annotation):
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def key_line(name: str, annotation, default: str, comment: str | None = "") -> str:
    line = f"  {name:<24} {type_name(annotation):<18} {default}"
    return f"{line}  # {comment}" if comment else line


def command_help(name: str, func) -> str:
    lines = [
        f"usage: dinokit {name} key=value ... [config=FILE.yaml]",
        "",
        inspect.getdoc(func) or "",
        "",
        "values are YAML (true, 3e-4, none); a list key takes [a, b] or a,b, and items holding commas are quoted "
        "in the list form: key=\"['a,b', c]\"",
        "",
        "keys:",
    ]
    hints = typing.get_type_hints(func)
    explained = explained_keys(inspect.getdoc(func) or "")
    for pname, p in inspect.signature(func).parameters.items():
        if p.kind is p.VAR_KEYWORD:
            if name not in FURTHER_KEYS:
                lines.append("  ...           further keys are passed on (see above)")
            continue
        value = list(p.default) if isinstance(p.default, tuple) else p.default  # as YAML writes it: [cls]
        default = "(required)" if p.default is p.empty else f"= {value!r}"
        meaning = COMMAND_KEYS.get(name, {}).get(pname, "see above" if pname in explained else SHARED_KEYS.get(pname))
        lines.append(key_line(pname, hints.get(pname, p.empty), default, meaning))
    if name in FURTHER_KEYS:
        presets = "preset" in inspect.signature(func).parameters
        lines += ["", *dataclass_keys(further_keys_class(name), presets)]
    return "\n".join(lines)


def further_keys_class(name: str):
    """The config dataclass whose fields are the further keys of command `name` (FURTHER_KEYS)."""
    module, cls = FURTHER_KEYS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def explained_keys(doc: str) -> set[str]:
    """The keys a docstring explains: the names before a colon that opens a line or a sentence, alone or
    listed (`model: ...`, `train, val: ...`, `min_depth, max_depth: ...`)."""
    name = r"`?\w+`?(?: \([^()]*\))?"  # a name, perhaps with a parenthesis: `nprobe (ivf: cells visited)`
    label = re.compile(rf"(?:^|[.;)]\s)({name}(?:(?:, | / | and ){name})*):\s", re.M)
    names = (re.findall(r"`?(\w+)`?(?: \([^()]*\))?(?:, | / | and |$)", m[1]) for m in label.finditer(doc))
    return {n for group in names for n in group}


def dataclass_keys(cls, presets: bool = False) -> list[str]:
    """--help lines for every field of a config dataclass: type, default and the comment beside it in
    the source, under the source's `# ---- group` headings."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    lines = [f"further keys ({cls.__name__}; these are its defaults{', a preset may change them' if presets else ''}):"]
    try:
        source = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # source not available: the fields without groups or comments
        source = []
    for text in source:
        heading = re.match(r"\s*# -+\s*(.+)", text)
        field = re.match(r"\s*(\w+)\s*:[^#]*(?:#\s*(.*))?$", text)
        if heading:
            lines.append(f" {heading[1]}:")
        elif field and field[1] in fields:
            lines.append(field_line(fields.pop(field[1]), hints, field[2] or ""))
    return lines + [field_line(f, hints) for f in fields.values()]  # any the source did not show on one line


def field_line(f: dataclasses.Field, hints: dict, comment: str = "") -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return key_line(f.name, hints[f.name], f"= {default!r}", comment)


def summary_line(name: str) -> str:
    """The first docstring line of command `name`'s function, read from its module's source without
    importing it (importing every command pulls in torch, torchvision, faiss: seconds for a help page)."""
    module, func = COMMANDS[name].split(":")
    source = Path(__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")  # no package __init__ run
    tree = ast.parse(source.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
    return (ast.get_docstring(node) or "").splitlines()[0]


def main_help() -> str:
    lines = ["usage: dinokit <command> key=value ...   (dinokit <command> --help for its keys)", "", "commands:"]
    for name in COMMANDS:
        try:
            doc = summary_line(name)
        except Exception as e:  # keep --help usable even if one module cannot be read
            doc = f"(unavailable: {e})"
        lines.append(f"  {name:<22} {doc}")
    return "\n".join(lines)


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """The longest run of leading words that names a command, and the rest."""
    words = []
    for arg in argv:
        if "=" in arg or arg.startswith("-"):
            break
        words.append(arg)
    for n in range(len(words), 0, -1):
        name = " ".join(words[:n])
        if name in COMMANDS:
            return name, argv[n:]
    given = " ".join(words)
    group = [name for name in COMMANDS if given and name.startswith(given + " ")]  # `eval`: every eval command
    if group:
        raise DinokitError(
            f"{given!r} is a group of commands; name one: {', '.join(group)}. Run `dinokit {group[0]} --help` "
            "for its keys."
        )
    close = difflib.get_close_matches(given, COMMANDS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise DinokitError(f"unknown command {given!r}.{hint} Run `dinokit --help` for the list.")


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: what went wrong, the path (of a rename: its target) and a hint."""
    path = e.filename2 if e.filename2 is not None else e.filename
    line = f"{e.strerror or e} ({path})" if path is not None else str(e)
    hint = OS_ERROR_HINTS.get(e.errno)
    return f"{line}: {hint}" if hint else line


def command_keys(name: str, func) -> set[str]:
    """Every key command `name` takes: its function's keyword arguments and its FURTHER_KEYS fields."""
    keys = set(inspect.signature(func).parameters)
    if name in FURTHER_KEYS:
        keys |= {f.name for f in dataclasses.fields(further_keys_class(name))}
    return keys


def describe_out_of_memory(error: BaseException, name: str, func, given: dict) -> str | None:
    """One line for torch running out of memory in command `name` (None for any other error): where,
    what torch said of sizes, and the keys that lower the command's memory (`memory_fixes`). Torch is
    asked only where it is loaded already: the error is not torch's otherwise."""
    if "torch" not in sys.modules or func is None:
        return None
    from dinokit.runtime import out_of_memory

    found = out_of_memory(error)
    if found is None:
        return None
    sizes = f" ({found.sizes})" if found.sizes else ""
    fixes = memory_fixes(name, func, given, on_cpu=found.device == "cpu")
    return f"out of memory on {found.device}{sizes}; " + (
        f"to use less: {fixes}" if fixes else "free memory there (other programs) or use a machine with more"
    )


def memory_fixes(name: str, func, given: dict, on_cpu: bool) -> str:
    """The keys of command `name` that lower its memory, with the values in use (`given`, else the
    defaults of its function): 'lower batch_size (now 64), image_size (now 224); set precision=bf16'.
    A command that has none but device= is told device=cpu where a GPU ran out."""
    keys = command_keys(name, func) - ({"fsdp"} if on_cpu else set())
    defaults = {k: p.default for k, p in inspect.signature(func).parameters.items() if p.default is not p.empty}
    now = {k: v for k, v in {**defaults, **given}.items() if v is not None}
    sizes = [f"{k} (now {now[k]})" if k in now else k for k in MEMORY_SIZES if k in keys]
    settings = [
        f"{k}={value}{note}"
        for k, (value, note) in MEMORY_SETTINGS.items()
        if k in keys and str(now.get(k)).lower() != value
    ]
    if not sizes and not settings and not on_cpu and "device" in keys:
        settings = ["device=cpu"]
    return "; ".join(
        [*([f"lower {', '.join(sizes)}"] if sizes else []), *([f"set {', '.join(settings)}"] if settings else [])]
    )


def print_error(message: str, shared: bool = False) -> None:
    """`dinokit: error: <message>` on stderr; in a torchrun job, once for an error that every process
    raises (`distributed.leave_shared_error_to_process_0`; imported there only, as it loads torch)."""
    if "RANK" in os.environ:
        from dinokit.distributed import leave_shared_error_to_process_0

        leave_shared_error_to_process_0(shared)
    print(f"dinokit: error: {message}", file=sys.stderr)


def print_interrupted() -> None:
    """`dinokit: interrupted` on stderr; in a torchrun job on process 0 alone: Ctrl-C reaches every
    process (torchrun passes it on), and the others exit quietly with the same status."""
    if "RANK" in os.environ:
        from dinokit.distributed import launched_as_process_0

        if not launched_as_process_0():
            return
    print("dinokit: interrupted", file=sys.stderr)


@functools.cache
def skip_the_last_collections_at_exit() -> None:
    """At the interpreter's exit, gc.freeze the objects still alive, so that its last garbage collections
    (run while it clears the modules) do not walk them all again: after torch, torch._dynamo and sympy
    were imported that took 0.5-0.6 s of every command's exit, and 1.5 s under torchrun (two processes
    sharing two cores); 0.2 s with them frozen. Nothing a command writes waits for them: its files are
    written and closed before it returns (dinokit.io), stdout and stderr are flushed at exit as before,
    and objects are still freed as their references go; only cyclic garbage is left to the operating
    system, as os._exit leaves everything. At exit only: a Python session calling `main` keeps its
    collections. Once per process."""
    atexit.register(gc.freeze)


def main(argv: list[str] | None = None) -> int:
    """`dinokit ...`; returns the exit status: 0 done, 1 output pipe closed, 2 error, 130 interrupted."""
    skip_the_last_collections_at_exit()
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        # a file name that is not UTF-8 (held as surrogate escapes) is printed as its own bytes, as `ls`
        # prints it, not a UnicodeEncodeError at the end of a job (stdout is strict in a UTF-8 locale)
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        status = run(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except BrokenPipeError:
        # the reader went away (`dinokit models | head -1`): stop quietly, with stdout on devnull so that
        # Python's last flush cannot fail again (the recipe of the Python docs, module signal)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run(argv: list[str]) -> int:
    """Run the command that `argv` names; user errors are one line on stderr, no traceback."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from dinokit import __version__

        print(f"dinokit {__version__}")
        return 0
    name, func, kwargs = "", None, {}
    try:
        name, rest = split_command(argv)
        func = resolve_command(name)
        if any(a in ("-h", "--help") for a in rest):
            print(command_help(name, func))
            return 0
        kwargs = build_kwargs(func, rest, name)
        result = func(**kwargs)
    except DinokitError as e:
        print_error(str(e), shared=isinstance(e, SharedError))
        return 2
    except BrokenPipeError:
        raise  # main: a closed output pipe ends quietly
    except OSError as e:  # a file system problem the command did not foresee: one line, no traceback
        print_error(describe_os_error(e))
        return 2
    except KeyboardInterrupt:
        print_interrupted()
        return 130
    except RuntimeError as e:  # out of memory (torch raises RuntimeErrors): one line; any other: the traceback
        message = describe_out_of_memory(e, name, func, kwargs)
        if message is None:
            raise
        print_error(message)
        return 2
    if isinstance(result, (dict, list)):
        print(json.dumps(result, indent=2, default=str))
    elif result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
