"""A pretraining run's images: the same ones on every process and across a resume (a fingerprint of
their names, which `dinokit finetune` records too), the dataset and loader of the sample stream, and
the k-NN monitor's labelled images."""

import hashlib
from pathlib import Path

import torch

from dinokit import distributed as dist
from dinokit.data.images import check_readable, plain_path
from dinokit.data.transforms import check_image_size
from dinokit.data.unlabelled import InMemoryMultiCrops, MultiCropDataset, StreamBatchSampler, decode_to_memory
from dinokit.errors import DinokitError, SharedError
from dinokit.io import path_bytes
from dinokit.runtime import ignore_stop_signals
from dinokit.train.checkpoint import list_checkpoints
from dinokit.train.config import PretrainConfig


# ---------------------------------------------------------------------------------------------- identity
def data_fingerprint(paths: list[Path], data: str) -> dict:
    """{"images": N, "sha256": hash of the paths relative to the data folder (or list file's folder)}:
    the same files give the same fingerprint wherever the dataset is mounted."""
    root = plain_path(Path(data).expanduser())  # as list_images spells the paths
    root = root if root.is_dir() else root.parent
    names = [p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p in paths]
    return {"images": len(paths), "sha256": hashlib.sha256(path_bytes("\n".join(names))).hexdigest()}


def check_same_data(checkpoint: dict, fingerprint: dict, data: str, out: Path) -> None:
    """A resumed run continues its data stream (the position in a shuffled order of N images), which
    only means something on the same images: refuse other data, and say what to do instead."""
    saved = checkpoint.get("data_fingerprint")
    if saved is not None and saved != fingerprint:
        backbone = out / "backbone.safetensors"
        start_from = (
            f"starting from this one with init={backbone}"
            if backbone.is_file()  # written at the end; before it, the newest checkpoint's teacher serves
            else f"starting from this one with init={list_checkpoints(out / 'checkpoints')[-1]} (its teacher)"
        )
        raise DinokitError(
            f"resume=true continues the run in {out}, trained on {saved['images']} images, but data={data} holds "
            f"{fingerprint['images']} images with other names. Resume with the run's own data, or train on the new "
            f"data in a new run (another out=...), {start_from}"
        )


def check_data_agrees(fingerprint: dict, data: str) -> None:
    """Every process streams its share of one shuffled order of the same N images: processes that list
    different images (copies that differ between nodes, a folder still being written at the start) would
    silently see some images twice and others never. Every process raises (the same SharedError, which
    process 0 prints), so none waits for the rest."""
    seen = dist.all_gather_objects(fingerprint)
    if any(other != seen[0] for other in seen):
        listed = ", ".join(f"process {rank}: {f['images']} images" for rank, f in enumerate(seen))
        raise SharedError(
            f"the processes list different images under data={data} ({listed}, or the same number with other "
            "names): every process must read the same dataset (one shared folder, or identical copies on "
            "every node); wait until the folder is complete before starting"
        )


# ---------------------------------------------------------------------------------------------- stream
def make_dataset(paths: list[Path], cfg: PretrainConfig, augmentation, collate, progress: bool):
    """The run's images as multi-crops: decoded and augmented one by one (MultiCropDataset), or for
    augmentation=batched decoded once into memory (`decode_to_memory`, a bar where `progress`) and
    augmented in whole batches (InMemoryMultiCrops)."""
    if cfg.augmentation == "batched":
        size = cfg.batched_image_size or cfg.global_crops_size
        images, bad = decode_to_memory(paths, size, cfg.num_workers, progress, cfg.reduced_decode)
        return InMemoryMultiCrops(images, bad, augmentation, collate, cfg.seed)
    return MultiCropDataset(paths, augmentation, seed=cfg.seed)


def make_loader(dataset, cfg: PretrainConfig, batch_size: int, start: int, device: torch.device, collate):
    """Batches of the sample stream from `start`: a DataLoader over a MultiCropDataset, or the
    in-process batches of InMemoryMultiCrops (augmentation=batched)."""
    sampler = StreamBatchSampler(len(dataset), batch_size, dist.rank(), dist.world_size(), seed=cfg.seed, start=start)
    if isinstance(dataset, InMemoryMultiCrops):
        return dataset.batches(sampler)
    workers = max(0, cfg.num_workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the loader off the global RNG
        worker_init_fn=ignore_stop_signals,  # Ctrl-C / SIGTERM stop the run in the main process, after a step
    )


# ---------------------------------------------------------------------------------------------- k-NN monitor
def knn_monitor_data(cfg: PretrainConfig, patch_size: int) -> dict | None:
    """The k-NN monitor's labelled images (`knn_top1`'s data: knn_train as the bank, knn_val classified
    with its classes) and image size, read and checked before training starts; None where it is off."""
    if not cfg.knn_every:
        return None
    from dinokit.eval.common import read_splits

    size = cfg.knn_image_size or cfg.global_crops_size
    check_image_size(size, patch_size, "knn_image_size")
    try:  # as `dinokit eval knn` reads them: two classes or more, no val image in the bank (its own neighbour)
        train, val, _ = read_splits(cfg.knn_train, cfg.knn_val)
    except DinokitError as e:
        raise DinokitError(f"the k-NN monitor's knn_train / knn_val (train / val below): {e}") from None
    check_readable(train.paths, cfg.knn_train)
    check_readable(val.paths, cfg.knn_val)
    return {
        "train": train.paths,
        "train_labels": train.labels,
        "test": val.paths,
        "test_labels": val.labels,
        "classes": train.class_names,
        "size": size,
    }
