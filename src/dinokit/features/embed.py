"""`dinokit embed`: features of a folder (or list) of images, written to disk in resumable shards.

The images are split into fixed shards of `shard_size` consecutive files (sorted folder order, or
the list's order). Each shard is written atomically once all its images are done, so a killed job
restarts where it stopped: shards on disk are skipped, the others computed. A shard records the size
and modification time of its files when they were read: a rerun computes again the shards of files
changed since (a photo exported again under its name). A rerun whose data= gained images extends the
embedding: its finished shards stay as they are, and the listed images in none of them are split into
new shards after them (`extend_run`; embed_config.json's `earlier_shards` counts the shards kept, and
the new images' split is fixed by the listing then, so a killed extension resumes like a first run).
One whose data= no longer lists an image of its shards (removed, renamed) is refused. Under
`torchrun --nproc_per_node N` (or several nodes sharing the output folder), shard i goes to process
i mod N; every process writes its own shards and process 0 writes the one manifest at the end.
The file layout is described in `dinokit.features.store`.
"""

import contextlib
import datetime
import hashlib
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dinokit import distributed
from dinokit.data.images import check_readable, list_images, plain_path
from dinokit.distributed import (
    all_gather_objects,
    barrier,
    compare_errors,
    destroy_distributed,
    init_distributed,
    is_distributed,
    launched_by_torchrun,
)
from dinokit.errors import DinokitError
from dinokit.eval.backbone import weights_hash
from dinokit.features.extract import FEATURE_KINDS, check_loader_settings, iter_features
from dinokit.features.store import (
    CONFIG,
    MANIFEST,
    SHARD_FORMATS,
    STORE_DTYPES,
    read_shard_index,
    read_shard_stamps,
    shard_path,
    write_shard,
)
from dinokit.io import (
    file_stamps,
    folder_lock,
    path_bytes,
    prepare_output,
    read_json,
    refuse_files_no_run_wrote,
    refuse_other_outputs,
    write_json,
)
from dinokit.models import load_model
from dinokit.runtime import effective_precision, resolve_device


def embed(
    model: str,
    data: str,
    out: str,
    image_size: int | list[int] = 224,
    resize_policy: str = "center_crop",
    features: list[str] = ("cls",),
    layers: list[int] = (),
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "bf16",
    dtype: str = "float32",
    format: str = "safetensors",
    shard_size: int | None = None,
    reduced_decode: bool = True,
    progress: bool = True,
) -> dict | None:
    """Embed every image of a folder / list file into shards under `out` (resumable; torchrun-ready).

    model: any weights file, folder or released name. data: a folder (recursive), a text file of
    paths, or one image. image_size: 224, or [height, width]; multiples of the patch size.
    resize_policy: center_crop (keep aspect, cover size*256/224, crop; the official transform) or
    resize (to exactly image_size). features: any of cls, patch_mean, registers, patch_tokens
    (the full grid), layers (CLS of the blocks listed in `layers`), layer_patch_tokens (the full patch
    grid of each block in `layers`; normed like the last block). precision: bf16 (autocast, fast)
    or fp32 (the manifest records fp32 where the device has no bf16 autocast). dtype: float32,
    float16 or bfloat16 (safetensors only) on disk. format: safetensors or numpy (.npz). shard_size:
    images per shard (default: up to 4096, fewer so that a shard stays near 512 MB, e.g. with
    patch_tokens). reduced_decode: large JPEGs decoded at 1/2, 1/4 or 1/8 scale, never below twice the
    resize (`ReducedJpegDecode`; false: whole). Unreadable images are skipped and listed in the manifest. Run
    again into the same out=, it resumes: images replaced since are embedded again, and images data= gained
    since (new photos) go into new shards after the finished ones, which stay as they are. The
    manifest records a hash of the weights (`weights_hash`), so that `dinokit index search` can tell
    when the model file changed. Returns a summary (on process 0; None on the others).
    """
    from dinokit.data.transforms import check_model_input_size, describe, eval_transform  # torchvision: not for --help

    started = time.perf_counter()
    out = str(Path(out).expanduser())  # "~/emb" from Python (a shell expands it on the command line)
    features, layers = list(features), list(layers)
    check_choices(features, layers, format, dtype, resize_policy)
    check_loader_settings(batch_size, num_workers)
    if shard_size is not None and shard_size < 0:
        raise DinokitError(f"shard_size must be a positive number of images (0 or none: automatic), got {shard_size}")
    prepare_output(out, folder=True, create=False)
    refuse_other_outputs(out, ("embed_config.json",), "dinokit embed")
    # gloo even on GPUs: processes only wait for each other and gather counts, never move tensors; the
    # timeout is long because they wait for each other only at the very end.
    joined = launched_by_torchrun() and not is_distributed()
    torch_device = init_distributed(resolve_device(device), backend="gloo", timeout=datetime.timedelta(days=7))
    rank, world = distributed.rank(), distributed.world_size()

    with contextlib.ExitStack() as held:  # the folder lock, from the run's checks to its manifest
        # an error that every process hits (no images found, ...) is printed once, by process 0
        with compare_errors():
            net = load_model(model, device=torch_device)
            if "registers" in features and not net.num_register_tokens:
                raise DinokitError(f"{model} has no register tokens; drop 'registers' from features")
            check_layers(layers, len(net.blocks))
            size = check_model_input_size(net, image_size)
            transform = eval_transform(size, resize_policy, reduced_decode=reduced_decode)
            data = spelling_of_run(Path(out) / CONFIG, data)
            paths = [str(plain_path(p.absolute())) for p in list_images(data)]  # no ../ from a relative data=
            check_readable(paths, data)
            out_dir = Path(out)
            out_dir.mkdir(parents=True, exist_ok=True)
            shapes = feature_shapes(net, size, features, layers)
            settings = {
                "model": str(Path(model).absolute()) if Path(model).exists() else model,
                "architecture": net.config.to_dict(),
                "weights_hash": weights_hash(net),
                "data": str(Path(data).absolute()),
                "num_images": len(paths),
                "paths_sha1": hashlib.sha1(path_bytes("\n".join(paths))).hexdigest(),
                "image_size": list(size),
                "patch_grid": [size[0] // net.patch_size, size[1] // net.patch_size],
                "resize_policy": resize_policy,
                "transform": describe(transform),
                "features": features,
                "layers": layers,
                "feature_shapes": shapes,
                "precision": effective_precision(torch_device, precision),
                "dtype": dtype,
                "format": format,
                "shard_size": shard_size or auto_shard_size(shapes, dtype),
            }
            if rank == 0:  # one embedding run at a time in out: a second would compute every shard again
                held.enter_context(folder_lock(out_dir, "an embedding run", wait=False))
        earlier = check_or_write_config(out_dir, settings, rank, paths)

        shards = plan_shards(out_dir, paths, earlier, settings["shard_size"], format)
        mine = [i for i in range(len(shards)) if i % world == rank]
        done = [i for i in mine if finished(shard_path(out_dir, i, format))]
        changed = {i: files for i in done if (files := changed_files(shard_path(out_dir, i, format)))}
        if changed:
            first = next(iter(changed.values()))[0]
            print(
                f"embed: {sum(map(len, changed.values()))} file(s) changed since they were embedded (first: {first}); "
                f"computing their {len(changed)} shard(s) again",
                file=sys.stderr,
            )
        todo = [i for i in mine if i not in done or i in changed]
        try:
            run_shards(net, shards, todo, out_dir, settings, transform, batch_size, num_workers, progress and rank == 0)
        except KeyboardInterrupt:
            if rank == 0:
                saved = sum(finished(shard_path(out_dir, i, format)) for i in range(len(shards)))
                print(
                    f"embed: stopped; {saved} of {len(shards)} shards are saved in {out_dir}, and the same command "
                    "resumes from there",
                    file=sys.stderr,
                )
            raise

        computed = sum(all_gather_objects(len(todo)))
        summary = None
        if rank == 0:
            manifest = write_manifest(out_dir, settings, len(shards))
            summary = {
                "out": str(out_dir),
                "images": len(paths),
                "embedded": manifest["num_embedded"],
                "bad_files": len(manifest["bad_files"]),
                "shards": len(shards),
                "computed_shards": computed,
                "resumed_shards": len(shards) - computed,
                "processes": world,
                "seconds": round(time.perf_counter() - started, 2),
            }
        barrier()
        if joined:
            destroy_distributed()
        return summary


def check_choices(features: list[str], layers: list[int], format: str, dtype: str, resize_policy: str) -> None:
    if not features or set(features) - set(FEATURE_KINDS):
        raise DinokitError(f"features must be a list of {', '.join(FEATURE_KINDS)}; got {features}")
    per_block = [k for k in ("layers", "layer_patch_tokens") if k in features]
    if per_block and not layers:
        raise DinokitError(f"features {per_block} need the block indices, e.g. layers=[8,9,10,11]")
    if layers and not per_block:
        raise DinokitError(
            f"layers={layers} is used by the features layers / layer_patch_tokens, which are not asked for: "
            f"add one, e.g. features=[{','.join([*features, 'layers'])}], or leave layers out"
        )
    if format not in SHARD_FORMATS:
        raise DinokitError(f"format must be one of {', '.join(SHARD_FORMATS)}, got {format!r}")
    if dtype not in STORE_DTYPES:
        raise DinokitError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if format == "numpy" and dtype == "bfloat16":
        raise DinokitError("numpy has no bfloat16: use dtype=float16 or float32, or format=safetensors")
    if resize_policy not in ("center_crop", "resize"):
        raise DinokitError(
            f"resize_policy for embed must be center_crop or resize (one shape per batch), got {resize_policy!r}"
        )


def check_layers(layers: list[int], depth: int) -> None:
    """Block indices checked before the run folder is started (an error at the first batch would leave
    settings that refuse the corrected command)."""
    wrong = [i for i in layers if not isinstance(i, int) or not -depth <= i < depth]
    if wrong:
        raise DinokitError(
            f"layers {wrong} are not blocks of this model: it has {depth} blocks, indices -{depth} to {depth - 1} "
            f"(negative ones count from the end, e.g. layers=[{depth - 1}] or [-1])"
        )


def feature_shapes(net, size: tuple[int, int], features: list[str], layers: list[int]) -> dict[str, list[int]]:
    """Per-image shape of each feature kind (patch grids as rows x columns, see GRID_DIM)."""
    d, r, p = net.embed_dim, net.num_register_tokens, net.patch_size
    grid = [size[0] // p, size[1] // p]
    shapes = {
        "cls": [d],
        "patch_mean": [d],
        "registers": [r, d],
        "patch_tokens": [*grid, d],
        "layers": [len(layers), d],
        "layer_patch_tokens": [len(layers), *grid, d],
    }
    return {k: shapes[k] for k in features}


# The dimension of the batched feature (from iter_features) that holds the row-major patch sequence,
# stored on disk as a (rows, columns) grid.
GRID_DIM = {"patch_tokens": 1, "layer_patch_tokens": 2}


def as_grids(feats: dict[str, torch.Tensor], grid: list[int]) -> dict[str, torch.Tensor]:
    """The batch's patch sequences (..., N, D) unflattened to (..., rows, columns, D)."""
    return {k: v.unflatten(GRID_DIM[k], grid) if k in GRID_DIM else v for k, v in feats.items()}


def auto_shard_size(shapes: dict[str, list[int]], dtype: str, target_bytes: int = 512 * 2**20) -> int:
    """Images per shard: 4096, or fewer so that one shard (held in memory until written) stays near
    `target_bytes`."""
    per_image = sum(math.prod(shape) for shape in shapes.values()) * STORE_DTYPES[dtype].itemsize
    return max(1, min(4096, target_bytes // max(per_image, 1)))


def spelling_of_run(config: Path, data: str) -> str:
    """`data` as the run in `config`'s folder spelled it, where both name the same folder or list (through
    a symlink, a relative path or `~`), so that a resumed run lists the same paths; else `data`."""
    if not config.is_file():
        return data
    before = read_json(config, "embed into a new out= folder").get("data")
    same = before is not None and Path(before).resolve() == Path(data).expanduser().resolve()
    return before if same else data


def changed_files(shard: Path) -> list[str]:
    """The files of a finished shard (its images, then its bad files) whose size or modification time
    differ from those the shard recorded when it read them (none for a shard that recorded none)."""
    recorded = read_shard_stamps(shard)
    kept, bad = read_shard_index(shard)
    if recorded is None or len(recorded) != len(kept) + len(bad):
        return []
    return [f for f, was, now in zip(kept + bad, recorded, file_stamps(kept + bad), strict=True) if was != now]


# the settings that say which images the shards split: the listing of data= (its size and hash) and the
# shards of earlier runs that its other images follow. A rerun may list more images (`extend_run`).
LISTING_KEYS = frozenset({"num_images", "paths_sha1", "earlier_shards"})


def check_or_write_config(out_dir: Path, settings: dict, rank: int, paths: list[str]) -> int:
    """A fresh folder gets the settings; a resumed one must have been started with the same ones. Where
    its data= lists other images (`paths`) since, process 0 extends the run (`extend_run`). Returns the
    number of shards of earlier runs, kept as they are, before the shards of the images in none of them."""
    path = out_dir / CONFIG
    # process 0 writes it while the others wait in compare_errors' gather (not a barrier, which they
    # would leave with gloo's traceback where process 0 fails, e.g. on a full disk)
    with compare_errors():
        if rank == 0 and not path.exists():
            check_no_unknown_shards(out_dir)
            write_json(path, {**settings, "earlier_shards": 0})
    # never "remove out": it may be the images' own folder (out=data)
    fix = f"embed into a new out= folder, or remove {path.name} and the shard_* files beside it and embed again"
    with compare_errors():  # every process's error: printed once
        previous = read_json(path, fix)
        keys = (settings.keys() | previous.keys()) - LISTING_KEYS
        changed = sorted(k for k in keys if settings.get(k) != previous.get(k))
        if changed:
            older = "transform" in changed and "ReducedJpegDecode" not in str(previous.get("transform"))
            hint = " (it decoded JPEGs whole: reduced_decode=false)" if older else ""
            raise DinokitError(
                f"{out_dir} holds embeddings made with other settings ({', '.join(changed)} differ; "
                f"see {path}). Use a new out= folder, or the same settings to resume{hint}."
            )
        if rank == 0 and not split_holds(out_dir, previous, settings):  # the others read its new split below
            extend_run(out_dir, settings, paths)
    with compare_errors():
        recorded = read_json(path, fix)
        if not same_listing(recorded, settings):  # process 0 recorded its listing: this one differs
            raise DinokitError(
                f"data={settings['data']} listed other images in process {rank} than in process 0 (the folder "
                "changed while the processes started): run the same command again"
            )
    return recorded.get("earlier_shards", 0)  # absent from folders started before runs were extended


def same_listing(config: dict, settings: dict) -> bool:
    return all(config.get(k) == settings[k] for k in ("num_images", "paths_sha1"))


def split_holds(out_dir: Path, config: dict, settings: dict) -> bool:
    """Whether the split recorded in `config` is this run's: the same listing of data=, and every shard
    of earlier runs finished (`plan_shards` reads their images from them)."""
    earlier = config.get("earlier_shards", 0)
    return same_listing(config, settings) and all(
        finished(shard_path(out_dir, i, settings["format"])) for i in range(earlier)
    )


def extend_run(out_dir: Path, settings: dict, paths: list[str]) -> None:
    """Record a new split in embed_config.json, where data= lists other images than the run that made the
    shards (photos added since), or a shard of an earlier run is gone: the finished shards from shard 0
    up to the first one missing stay as they are, and the listed images in none of them go into new
    shards after those (`plan_shards`). Shard files after the first one missing (a killed run's) are
    removed first, as their images are split anew. Refused where an image of the kept shards is no
    longer listed (removed, or renamed): an embedding cannot drop it."""
    format = settings["format"]
    count, embedded = 0, []
    while finished(shard := shard_path(out_dir, count, format)):
        good, bad = read_shard_index(shard)
        embedded += good + bad
        count += 1
    listed = set(paths)
    gone = sorted({p for p in embedded if p not in listed})
    if gone:
        raise DinokitError(
            f"data={settings['data']} lists {len(paths)} images now, and {len(gone)} image(s) of the shards in "
            f"{out_dir} are not among them (removed or renamed, first {gone[0]}): an embedding takes the images "
            "added to its data=, but cannot drop those it holds. Embed into a new out= folder, or remove "
            f"{CONFIG} and the shard_* files there to embed everything again"
        )
    later = [p for p in out_dir.glob(f"shard_*{SHARD_FORMATS[format]}") if shard_number(p) >= count]
    for shard in later:  # before the new split is recorded: a resumed run would take them as its own
        shard.unlink()
    write_json(out_dir / CONFIG, {**settings, "earlier_shards": count})
    known = set(embedded)
    added = [p for p in paths if p not in known]
    if added:
        again = f"; {len(later)} shard(s) after a missing one are computed again" if later else ""
        print(
            f"embed: {len(added)} listed image(s) are in none of the {count} finished shard(s) of {out_dir} "
            f"(first: {added[0]}): embedding them into new shards from {shard_path(out_dir, count, format).name}"
            f"{again}",
            file=sys.stderr,
        )


def shard_number(shard: Path) -> int:
    """i of shard_<i>.<suffix> (-1 for another name)."""
    number = shard.name.removeprefix("shard_").split(".")[0]
    return int(number) if number.isdigit() else -1


def plan_shards(out_dir: Path, paths: list[str], earlier: int, step: int, format: str) -> list[list[str]]:
    """The files of each shard, in order: the `earlier` shards of earlier runs (finished) with their own
    files (images and bad files, in listing order), then the listed files in none of them, `step` at a
    time, in listing order (a first run: `paths` split in `step`s)."""
    order: dict[str, int] = {}
    for i, p in enumerate(paths):
        order.setdefault(p, i)
    shards = []
    for i in range(earlier):
        good, bad = read_shard_index(shard_path(out_dir, i, format))
        shards.append(sorted(good + bad, key=order.__getitem__))
    kept = {p for shard in shards for p in shard}
    new = [p for p in paths if p not in kept]
    return shards + [new[i : i + step] for i in range(0, len(new), step)]


def check_no_unknown_shards(out_dir: Path) -> None:
    """Shards without the embed_config.json of their run (removed, or not copied with them) were made
    with unknown settings: resuming would mix them with shards of this run's settings, so it is refused.
    So is a manifest.json without it: a file of the user's (a dataset's own list), which the run's
    manifest would replace."""
    shards = sorted(p.name for p in out_dir.glob("shard_*") if p.suffix in SHARD_FORMATS.values())
    if shards:
        raise DinokitError(
            f"{out_dir} holds {len(shards)} shard(s) ({shards[0]}, ...) but no {CONFIG}, which records the settings "
            "they were made with, so they cannot be resumed safely: use a new out= folder, or remove its shard_* "
            "files to embed everything again"
        )
    refuse_files_no_run_wrote(out_dir, (MANIFEST,), (CONFIG,), "dinokit embed")


def finished(shard: Path) -> bool:
    """Whether a shard is on disk and readable; a damaged one (dinokit writes whole shards, but e.g. an
    interrupted copy of the folder cuts one short) is computed again."""
    if not shard.exists():
        return False
    try:
        read_shard_index(shard)
    except DinokitError:
        print(f"dinokit: {shard} is damaged; computing it again", file=sys.stderr)
        return False
    return True


def run_shards(net, shards, todo, out_dir, settings, transform, batch_size, num_workers, progress) -> None:
    """Embed the shards listed in `todo` with one DataLoader, writing each shard as soon as it is full."""
    shapes = {k: settings["feature_shapes"][k] for k in settings["features"]}
    if not todo:
        return
    queue = [p for i in todo for p in shards[i]]
    bar = tqdm(total=len(queue), desc="embed", unit="img", disable=not progress)
    current, start = 0, 0  # shard being filled (position in todo), its first index in `queue`
    stamps = {i: file_stamps(shards[i]) for i in todo}  # before the files are read: a later change shows
    pending: dict[str, list[torch.Tensor]] = {}
    kept: list[int] = []
    bad: list[int] = []
    batches = iter_features(
        net,
        queue,
        transform,
        which=settings["features"],
        layers=settings["layers"],
        batch_size=batch_size,
        num_workers=num_workers,
        precision=settings["precision"],
        progress=False,
    )
    try:  # the bar closed before a stop's message (Ctrl-C), which then has a line of its own
        for good, feats, bad_batch in batches:
            feats = as_grids(feats, settings["patch_grid"])
            bar.update(len(good) + len(bad_batch))
            kept += good.tolist()
            bad += bad_batch
            for k, v in feats.items():
                pending.setdefault(k, []).append(v)
            # `kept` and `bad` hold the indices seen since the current shard began; a batch may run past
            # the shard's end, so the features are split there
            while current < len(todo) and len(kept) + len(bad) >= len(shards[todo[current]]):
                end = start + len(shards[todo[current]])
                n_in = sum(1 for i in kept if i < end)
                stacked = {k: torch.cat(pending.get(k, [torch.zeros(0, *shape)])) for k, shape in shapes.items()}
                shard_feats = {k: v[:n_in] for k, v in stacked.items()}
                pending = {k: [v[n_in:]] for k, v in stacked.items()}
                shard_kept, shard_bad = [queue[i] for i in kept if i < end], [queue[i] for i in bad if i < end]
                stamp_of = dict(zip(shards[todo[current]], stamps[todo[current]], strict=True))
                write_shard(
                    shard_path(out_dir, todo[current], settings["format"]),
                    shard_feats,
                    shard_kept,
                    shard_bad,
                    settings["dtype"],
                    [stamp_of[p] for p in shard_kept + shard_bad],
                )
                kept = [i for i in kept if i >= end]
                bad = [i for i in bad if i >= end]
                current, start = current + 1, end
    finally:
        bar.close()


def write_manifest(out_dir: Path, settings: dict, num_shards: int) -> dict:
    """One manifest for the whole run, from the shards on disk (written by every process)."""
    entries, bad_files, embedded = [], [], 0
    for i in range(num_shards):
        path = shard_path(out_dir, i, settings["format"])
        if not path.exists():
            raise DinokitError(f"{path} is missing: a process did not finish; run the same command again")
        shard_paths, shard_bad = read_shard_index(path)
        entries.append({"file": path.name, "count": len(shard_paths), "bad": len(shard_bad)})
        bad_files += shard_bad
        embedded += len(shard_paths)
    manifest = {
        **settings,
        "num_embedded": embedded,
        "bad_files": bad_files,
        "shards": entries,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out_dir / MANIFEST, manifest)
    for stale in out_dir.glob(".shard_*.tmp*"):  # left by a killed process; every process is done now
        stale.unlink()
    return manifest
