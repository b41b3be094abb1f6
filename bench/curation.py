"""Data curation on CIFAR-10, where the truth is known: does each `dinokit curate` step do what it says?

0. speed: deduplicate and hierarchical_kmeans on 50,000 random vectors of dimension 384 (--devices: per device).
1. dedup: the 10k test images plus planted near-copies of 500 of them (JPEG quality 30 re-encodes,
   a 2-pixel shift, a 24 px round trip, a brightness change, a horizontal flip; 100 of each), appended
   after the originals: the precision and recall of the removals at several thresholds, and the time.
   Then `reference=`: a pool of 2000 test images and 200 train images copied into it (JPEG re-encodes),
   deduplicated against the 50k train images: how many of the 200 are found.
2. cluster + sample, first on 10 Gaussian blobs of known membership (5000 points in one, 250 in each
   other), then on an imbalanced pool of images (all 5000 train images of class 0, 250 of each other
   class): hierarchical k-means of one to three levels, with and without resampling, then 1500 points by
   `curate sample`'s hierarchical sampling against 1500 drawn uniformly: the share of the big blob /
   class 0, and the entropy of the class histogram.
3. retrieve: 20 train images of one class as seeds, the 10k test images as the pool: the share of the
   seed class among the selected images (neighbours, per_seed=10; and seed clusters), against 10% by
   chance; averaged over the ten classes.

The answers depend on the features: pass a backbone that has learned something (a randomly
initialised ViT maps all images almost alike), e.g. `dinokit pretrain data=/tmp/cifar10/train
preset=cpu32 max_minutes=10 out=RUN` and RUN/backbone.safetensors:

    PYTHONPATH=src flock /tmp/dinokit-heavy.lock .venv/bin/python bench/curation.py --model RUN/backbone.safetensors
    PYTHONPATH=src .venv/bin/python bench/curation.py --speed-only --devices cpu,cuda   # section 0 on a GPU too

Needs CIFAR-10 extracted as DATA/train and DATA/test (bench/learn_cifar10.py extracts it to /tmp/cifar10).
"""

import argparse
import contextlib
import io
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from dinokit.curation.commands import cluster, dedup, retrieve, sample
from dinokit.curation.dedup import deduplicate
from dinokit.curation.kmeans import hierarchical_kmeans
from dinokit.curation.sampling import hierarchical_sampling
from dinokit.data.labelled import read_labelled
from dinokit.features.embed import embed
from dinokit.io import atomic_write
from dinokit.retrieval.index import normalise

# (levels, n_resamples) of section 2a; sample_size is half the average cluster size, as curate cluster's default
SETTINGS = [([10], 0), ([100], 0), ([100, 10], 0), ([100, 10], 10), ([1000, 100, 10], 10)]


def near_copy(path: str, kind: str, out: Path, number: int) -> str:
    """A near-copy of a 32 px image, made one of five ways, named by `number`; returns its path."""
    image = Image.open(path).convert("RGB")
    target = out / f"{number:05d}_{kind}.png"  # CIFAR's class folders reuse file names
    if kind == "jpeg":
        target = target.with_suffix(".jpg")
        image.save(target, quality=30)
        return str(target)
    if kind == "shift":
        image = ImageOps.expand(image, border=2, fill=(0, 0, 0)).crop((0, 2, 32, 34))
    elif kind == "rescale":
        image = image.resize((24, 24), Image.Resampling.BICUBIC).resize((32, 32), Image.Resampling.BICUBIC)
    elif kind == "brightness":
        image = ImageEnhance.Brightness(image).enhance(1.2)
    elif kind == "flip":
        image = ImageOps.mirror(image)
    image.save(target)
    return str(target)


def write_list(path: Path, paths: list[str]) -> str:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(p + "\n" for p in paths)))
    return str(path)


def class_entropy(labels: list[int], classes: int) -> float:
    """Entropy of the class histogram in bits (log2 10 = 3.32 when balanced)."""
    counts = np.bincount(labels, minlength=classes) / len(labels)
    return float(-(counts[counts > 0] * np.log2(counts[counts > 0])).sum())


def quiet(step, *args, **kwargs):
    """Run a curate command without its printed summary (this script prints the figures)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return step(*args, **kwargs)


def speed(rng: np.random.Generator, n: int, devices: list[str]) -> None:
    """Section 0: deduplicate and hierarchical_kmeans on n random unit vectors of dimension 384, per device."""
    print(f"## 0. speed: {n:,} random unit vectors of dimension 384 (50,000: CIFAR-10 train in ViT-S features)")
    x = normalise(rng.normal(size=(n, 384)))
    for device in devices:
        if device != "cpu":  # CUDA's first calls load and tune kernels: not part of the timing
            deduplicate(x[:2048], 0.95, device=device)
            hierarchical_kmeans(x[:2048], [10, 2], 1, [5, 2], device=device)
        start = time.perf_counter()
        kept = len(deduplicate(x, 0.95, device=device).keep)
        print(f"[{device}] deduplicate (exact, threshold 0.95): {time.perf_counter() - start:.1f} s, {kept} kept")
        for levels, resamples in (([100, 10], 0), ([100, 10], 10)):
            start = time.perf_counter()
            hierarchical_kmeans(x, levels, resamples, [max(1, n // 200), 5], device=device)
            seconds = time.perf_counter() - start
            print(f"[{device}] hierarchical_kmeans {levels}, {resamples} resamples: {seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a backbone file dinokit.load_model reads (sections 1-3)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--speed-only", action="store_true", help="section 0 only (no images, no model)")
    parser.add_argument("--devices", default="cpu", help="section 0's devices, e.g. cpu,cuda (one after the other)")
    parser.add_argument("--n", type=int, default=50_000, help="section 0's number of vectors")
    args = parser.parse_args()
    if not args.speed_only and args.model is None:
        parser.error("--model is needed for sections 1-3 (or pass --speed-only)")
    rng = np.random.default_rng(0)
    speed(rng, args.n, args.devices.split(","))
    if args.speed_only:
        return
    train, train_labels, classes = read_labelled(args.data / "train")
    test, test_labels, _ = read_labelled(args.data / "test", classes=classes)
    train, test = [str(p.absolute()) for p in train], [str(p.absolute()) for p in test]  # as embed lists them
    label_of = dict(zip(train + test, train_labels + test_labels, strict=True))
    work = Path(tempfile.mkdtemp(prefix="dinokit-curation-bench-"))
    options = dict(image_size=args.image_size, resize_policy="resize", num_workers=1, progress=False)

    def embedded(name: str, paths: list[str]) -> str:
        start = time.perf_counter()
        embed(args.model, write_list(work / f"{name}.txt", paths), str(work / name), **options)
        print(f"  (embedded {len(paths)} images for {name} in {time.perf_counter() - start:.1f} s)")
        return str(work / name)

    # ---- 1. dedup
    print("## 1. dedup: 10k test images + 500 planted near-copies")
    copies_dir = work / "copies"
    copies_dir.mkdir()
    kinds = ["jpeg", "shift", "rescale", "brightness", "flip"]
    originals = [test[i] for i in rng.choice(len(test), 500, replace=False)]
    copies = [near_copy(p, kinds[i % 5], copies_dir, i) for i, p in enumerate(originals)]
    kind_of = {c: kinds[i % 5] for i, c in enumerate(copies)}
    pool = embedded("dedup_pool", test + copies)
    print("| threshold | removed | planted copies removed (recall) | precision | recall per kind | seconds |")
    print("|---|---|---|---|---|---|")
    for threshold in (0.9, 0.95, 0.98, 0.99):
        start = time.perf_counter()
        quiet(dedup, pool, str(work / "dedup"), threshold=threshold, num_examples=0)
        seconds = time.perf_counter() - start
        kept = set((work / "dedup" / "kept.txt").read_text().splitlines())
        removed = [p for p in test + copies if p not in kept]
        planted = [p for p in removed if p in kind_of]
        per_kind = Counter(kind_of[p] for p in planted)
        recall_by_kind = " / ".join(f"{k} {per_kind[k]}" for k in kinds)
        precision = len(planted) / max(1, len(removed))
        print(
            f"| {threshold} | {len(removed)} | {len(planted)} ({len(planted) / 5:.0f}%) | {precision:.1%} | "
            f"{recall_by_kind} (of 100) | {seconds:.1f} |"
        )

    print("\n## 1b. dedup against a reference: 2000 test images + 200 JPEG copies of train images, reference = train")
    chosen = rng.choice(len(train), 200, replace=False)
    leaked = [near_copy(train[i], "jpeg", copies_dir, 1000 + n) for n, i in enumerate(chosen)]
    pool = embedded("leak_pool", test[:2000] + leaked)
    reference = embedded("train", train)
    for threshold in (0.95, 0.98):
        start = time.perf_counter()
        summary = quiet(dedup, pool, str(work / "leak"), threshold=threshold, reference=reference, num_examples=0)
        kept = set((work / "leak" / "kept.txt").read_text().splitlines())
        found = sum(p not in kept for p in leaked)
        wrong = sum(p not in kept for p in test[:2000])
        print(
            f"threshold {threshold}: {found} of the 200 copies of train images removed, {wrong} of the 2000 test "
            f"images removed ({summary['removed_reference']} for the reference), {time.perf_counter() - start:.1f} s"
        )

    # ---- 2. cluster + sample
    print("\n## 2a. balancing known concepts: 10 Gaussian blobs in 64-D, 5000 points in blob 0 and 250 in each other")
    print("| spread | " + " | ".join(f"{levels} n_resamples={r}" for levels, r in SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for spread in (0.3, 0.6, 0.9, 1.2):
        centres = rng.normal(size=(10, 64))
        blob = np.array([0] * 5000 + [c for c in range(1, 10) for _ in range(250)])
        x = centres[blob] + spread * rng.normal(size=(len(blob), 64))
        shares = []
        for levels, resamples in SETTINGS:
            counts = [len(x), *levels[:-1]]
            sizes = [max(1, n // (2 * k)) for n, k in zip(counts, levels, strict=True)]
            chosen = hierarchical_sampling(hierarchical_kmeans(normalise(x), levels, resamples, sizes), 1500)
            shares.append(f"{np.mean(blob[chosen] == 0):.1%}")
        print(f"| {spread} | " + " | ".join(shares) + " |")
    by_chance = f"{np.mean(blob == 0):.1%}"  # 5000 of 7250
    print(f"(share of blob 0 among 1500 points drawn by hierarchical_sampling; {by_chance} by a uniform draw)")

    print("\n## 2b. balancing an imbalanced pool: 5000 images of class 0 and 250 of each other class")
    by_class = [[p for p, y in zip(train, train_labels, strict=True) if y == c] for c in range(len(classes))]
    imbalanced = by_class[0] + [p for c in range(1, len(classes)) for p in by_class[c][:250]]
    pool = embedded("imbalanced", imbalanced)
    uniform = [imbalanced[i] for i in rng.choice(len(imbalanced), 1500, replace=False)]
    labels = [label_of[p] for p in uniform]
    print("| 1500 images chosen by | class-0 share | class entropy (bits, balanced 3.32) | seconds |")
    print("|---|---|---|---|")
    print(f"| uniform random draw | {labels.count(0) / 1500:.1%} | {class_entropy(labels, 10):.2f} | - |")
    for levels, resamples in SETTINGS[2:]:
        start = time.perf_counter()
        quiet(cluster, pool, str(work / "clusters"), n_clusters=levels, n_resamples=resamples)
        quiet(sample, str(work / "clusters"), str(work / "sample"), target_size=1500)
        seconds = time.perf_counter() - start
        labels = [label_of[p] for p in (work / "sample" / "selected.txt").read_text().splitlines()]
        print(
            f"| curate cluster {levels} (n_resamples={resamples}) + sample | {labels.count(0) / 1500:.1%} | "
            f"{class_entropy(labels, 10):.2f} | {seconds:.1f} |"
        )

    # ---- 3. retrieve
    print("\n## 3. retrieval: 20 seed images of one class, the 10k test images as the pool (chance: 10%)")
    pool = embedded("test", test)
    quiet(cluster, pool, str(work / "test_clusters"), n_clusters=[100], n_resamples=0)
    shares: dict[str, list[float]] = {"neighbours (per_seed=10)": [], "seed clusters (per_seed=10)": []}
    for c in range(len(classes)):
        seeds = embedded(f"seeds_{c}", [by_class[c][i] for i in range(250, 270)])
        for mode, where in (
            ("neighbours (per_seed=10)", {"pool": pool}),
            ("seed clusters (per_seed=10)", {"clusters": str(work / "test_clusters")}),
        ):
            quiet(retrieve, seeds, str(work / "retrieved"), per_seed=10, num_examples=0, **where)
            chosen = (work / "retrieved" / "selected.txt").read_text().splitlines()
            shares[mode].append(sum(label_of[p] == c for p in chosen) / max(1, len(chosen)))
    for mode, values in shares.items():
        spread = f"per class {min(values):.0%}-{max(values):.0%}"
        print(f"{mode}: seed class {np.mean(values):.1%} of the selected images ({spread})")
    print(f"\n(work folder {work}; log2 10 = {math.log2(10):.2f})")


if __name__ == "__main__":
    main()
