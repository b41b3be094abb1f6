"""Released weights by name: the official download URLs and the Hugging Face Hub.

A name resolves to a local file or folder, downloaded once into the cache (`$DINOKIT_CACHE`, default
`~/.cache/dinokit`). Offline, the error says so and shows how to pass a local file instead.
"""

import errno
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dinokit.errors import DinokitError
from dinokit.io import atomic_write_large

_OFFICIAL = "https://dl.fbaipublicfiles.com"
_DINO_V1_FILES = {
    "dino_vits16": "dino_deitsmall16_pretrain",
    "dino_vits8": "dino_deitsmall8_pretrain",
    "dino_vitb16": "dino_vitbase16_pretrain",
    "dino_vitb8": "dino_vitbase8_pretrain",
}
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".onnx")
# Hugging Face Hub ids of the same weights (transformers layout).
HF_NAMES = {
    f"dinov2_vit{s}14{'_reg' if reg else ''}": f"facebook/dinov2-{'with-registers-' if reg else ''}{size}"
    for s, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    for reg in (False, True)
}


def official_url(name: str) -> str | None:
    """Download URL of a released official backbone name, or None."""
    if name in _DINO_V1_FILES:
        f = _DINO_V1_FILES[name]
        return f"{_OFFICIAL}/dino/{f}/{f}.pth"
    if name in HF_NAMES:
        base = name.removesuffix("_reg")
        file = f"{base}_reg4" if name.endswith("_reg") else base
        return f"{_OFFICIAL}/dinov2/{base}/{file}_pretrain.pth"
    return None


# The released DINOv2 heads: task -> (datasets, kinds), named <backbone>[_<dataset>]_<kind>_head. The
# ImageNet-1k classification heads exist for every backbone (`_reg4` in file names), the segmentation
# and depth heads for the backbones without registers.
RELEASED_HEADS = {
    "classification": ((None,), ("linear", "linear4")),
    "segmentation": (("ade20k", "voc2012"), ("linear", "ms")),
    "depth": (("nyu", "kitti"), ("linear", "linear4", "dpt")),
}


@dataclass(frozen=True)
class HeadName:
    """A released head's name, or its file's: dinov2_vitb14_voc2012_ms_head -> (dinov2_vitb14, segmentation,
    voc2012, ms). backbone: the released backbone (dinokit's name, `_reg` for registers), or None where
    the name's prefix is no released backbone with heads of that task (my_nyu_dpt_head.pth)."""

    backbone: str | None
    task: str
    dataset: str | None
    kind: str

    @property
    def url(self) -> str | None:
        """The download URL (None without a released backbone)."""
        if self.backbone is None:
            return None
        base = self.backbone.removesuffix("_reg")
        full = f"{base}_reg4" if self.backbone.endswith("_reg") else base
        middle = f"_{self.dataset}" if self.dataset else ""
        return f"{_OFFICIAL}/dinov2/{base}/{full}{middle}_{self.kind}_head.pth"


def released_head(name: str | os.PathLike) -> HeadName | None:
    """The parts of a released head's name (dinov2_vits14_reg_linear4_head, dinov2_vitl14_kitti_dpt_head) or
    of its file's name (.../dinov2_vits14_reg4_linear4_head.pth); else None."""
    stem = Path(name).name.removesuffix(".pth")
    for task, (datasets, kinds) in sorted(RELEASED_HEADS.items(), key=lambda item: item[1][0] == (None,)):
        for dataset in datasets:  # datasets first: dinov2_vits14_nyu_linear_head is not a classifier's
            for kind in kinds:
                prefix = stem.removesuffix(f"{f'_{dataset}' if dataset else ''}_{kind}_head")
                if prefix == stem:
                    continue
                backbone = prefix.replace("_reg4", "_reg") if task == "classification" else prefix
                has_heads = backbone in HF_NAMES and (task == "classification" or not backbone.endswith("_reg"))
                return HeadName(backbone if has_heads else None, task, dataset, kind)
    return None


def released_head_url(name: str) -> str | None:
    """Download URL of a released head's bare name (`released_head`); None for anything else, a file name
    included (a local file is never downloaded)."""
    head = released_head(name)
    return None if head is None or Path(name).suffix else head.url


def cache_dir() -> Path:
    return Path(os.environ.get("DINOKIT_CACHE", Path.home() / ".cache" / "dinokit"))


def resolve(source: str | os.PathLike) -> Path:
    """Local path for `source`: an existing path as is; a released name or Hub id downloaded (cached).
    A missing path that `looks_local` (weights extension, or an existing parent folder) is reported as
    not found rather than looked up on the Hub."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    name = str(source)
    url = official_url(name)
    if url is not None:
        return _download_url(name, url)
    if looks_local(path):
        folder = path.absolute().parent
        why = f"{folder} has no {path.name}" if folder.is_dir() else f"there is no folder {folder}"
        raise DinokitError(
            f"file not found: {path}. No such file or folder ({why}): check the spelling and the current "
            f"folder, or pass an absolute path.{did_you_mean(path)} Released names have no file extension, e.g. "
            "dinov2_vits14 or facebook/dinov2-small."
        )
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _download_hub(name)
    if name.startswith("random:"):  # eval.backbone.RANDOM_PREFIX, which the eval and picture commands take
        raise DinokitError(
            f"{name!r} (an untrained network) is taken only where a random baseline means something: the eval "
            "commands and the pictures (visualize, segment, track). Here trained weights are needed: a released "
            "name (e.g. dinov2_vits14), a weights file or folder, or a pretraining run folder."
        )
    known = ", ".join([*HF_NAMES, *_DINO_V1_FILES])
    raise DinokitError(
        f"No such file or folder: {name!r}; nor is it a released model name.{did_you_mean(path)} "
        f"Released names: {known}; or a Hugging Face id such as facebook/dinov2-small."
    )


def did_you_mean(path: Path) -> str:
    """' Did you mean X?' for a mistyped released name, Hub id, or entry of the folder `path` names
    (`dinov2_vit14`, `runs/my_rn`), else ''."""
    import difflib

    local = [str(path.parent / entry.name) for entry in path.parent.iterdir()] if path.parent.is_dir() else []
    candidates = [*HF_NAMES, *HF_NAMES.values(), *_DINO_V1_FILES, *local]
    close = difflib.get_close_matches(str(path), candidates, n=3, cutoff=0.75)
    return f" Did you mean {' or '.join(close)}?" if close else ""


def looks_local(path: Path) -> bool:
    """True for a name that is meant as a local path, not a Hub id: one ending in a weights file
    extension, or one inside a folder that exists here (`weights/missing.pth`, `runs/typo`)."""
    return path.suffix in WEIGHT_SUFFIXES or (len(path.parts) > 1 and path.parent.is_dir())


def _offline_error(
    name: str, where: str, error: Exception, cached_as: Path | None = None, hint: str = "", key: str = "model"
) -> DinokitError:
    """The download failed: say how to go on without a connection. `cached_as`: the file the name is
    looked up as before any download, where a copy makes the name itself work offline; `hint` ends
    the message (a likely misspelling); `key`: the command-line key that takes the local file."""
    keep_name = (
        f" Or copy the file to {cached_as}, where {name!r} is looked up before any download, and the name works."
        if cached_as is not None
        else ""
    )
    example = (
        "e.g. dinokit.load_model('/path/to/file.pth') or model=/path/to/file.pth on the command line (any "
        "official .pth, Hugging Face folder, timm or dinokit file works)"
        if key == "model"
        else f"e.g. {key}=/path/to/{url_name(where)} on the command line"
    )
    return DinokitError(
        f"Could not download {name!r} from {where} ({type(error).__name__}: {error}). This machine may be "
        f"offline. Download the weights where there is a connection, copy them here and pass the local "
        f"path instead, {example}.{keep_name}{hint}"
    )


def url_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _download_url(name: str, url: str, key: str = "model") -> Path:
    """The cached file of `url` (downloaded once, whole: see check_whole_archive); offline, an error
    naming `key` for a local copy. A download killed partway leaves its temporary files in a folder that
    the next download of the name removes (io.atomic_write_large)."""
    target = cache_dir() / url_name(url)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    import torch.hub

    def fetch(tmp: str) -> None:
        torch.hub.download_url_to_file(url, tmp, progress=True)
        check_whole_archive(Path(tmp), url)

    try:
        atomic_write_large(target, fetch)  # in the cache only once checked
    except DinokitError:
        raise
    except Exception as e:  # urllib raises URLError, socket errors, HTTP errors...
        if local_disk_error(e):
            raise
        raise _offline_error(name, url, e, cached_as=target, key=key) from None
    return target


# OSErrors of the cache's own disk, not of the network (whose errors are OSErrors too: URLError, socket errors)
LOCAL_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def local_disk_error(e: Exception) -> bool:
    """Whether a download failed on this machine's disk (full, over quota, read-only): the CLI names
    the file and the fix, where the offline error would send the user after the network."""
    return isinstance(e, OSError) and e.errno in LOCAL_DISK_ERRNOS


def check_whole_archive(path: Path, url: str) -> None:
    """A DinokitError where the file downloaded from `url` is a torch archive (zip; every released .pth
    is one) cut short, or empty: a connection closed early reads as the end of the file in urllib
    (http.client does not compare the length received with Content-Length), and torch.hub keeps it."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path):  # its directory is at the end: a file cut short has none
                return
        except zipfile.BadZipFile:
            pass
    elif head:
        return
    raise DinokitError(
        f"the download of {url} stopped short ({path.stat().st_size} bytes, not the whole file; nothing was "
        "kept): run the same command again, or download the file where the connection is steady and pass its "
        "local path"
    )


# What is fetched of a Hub repo: its safetensors; only where it has none, its pytorch_model.bin (read
# weights_only, as every torch file), single or sharded. Its other files (other formats, README) never.
_HUB_SAFETENSORS = ["config.json", "*.safetensors", "*.safetensors.index.json"]
_HUB_BIN = ["config.json", "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


def _download_hub(repo_id: str) -> Path:
    """The snapshot folder of `repo_id` with its config and safetensors weights, or where the snapshot
    has no safetensors file (older repos), with its pytorch_model.bin. `snapshot_download` lists the
    repo itself, and offline serves a snapshot cached earlier (of either kind)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_SAFETENSORS, cache_dir=cache_dir() / "hub"))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_BIN, cache_dir=cache_dir() / "hub"))
    except Exception as e:  # offline, gated, missing repo: the hub raises many types
        if local_disk_error(e):
            raise
        hint = "" if repo_id in HF_NAMES.values() else did_you_mean(Path(repo_id))
        raise _offline_error(repo_id, "the Hugging Face Hub", e, hint=hint) from None
    return folder
