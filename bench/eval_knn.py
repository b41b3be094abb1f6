"""k-NN benchmark: dinokit.eval.knn against scikit-learn's KNeighborsClassifier (brute force, cosine),
in the same run, on 50,000 x 10,000 features of dimension 384.

Features: CIFAR-10 (the 50k train / 10k test JPEGs of ../shared/data/cifar10-jpg.tar.gz) through a
randomly initialised dinov2_vits14 (seed 0, 384 dims) at 56 px. No pretrained weights can be
downloaded here; these features are input-dependent and cluster by class (their k-NN accuracy is
printed), which is what a search over them costs. They are extracted once, through dinokit's feature
cache (/tmp/dinokit-bench-cache), so reruns only time the search.

Each method runs `--repeats` times in a fresh subprocess (median time; peak resident memory above the
loaded features). scikit-learn gets DINO's weighting (weights = exp(cos / T), T = 0.07, as a callable
of the cosine distance), so its k=20 predictions must equal dinokit's exactly.

    PYTHONPATH=src flock /tmp/dinokit-heavy.lock .venv/bin/python bench/eval_knn.py
"""

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (CI), or beside a folder above it (git worktrees)
TARBALL = next(
    (p / "shared" / "data" / "cifar10-jpg.tar.gz" for p in ROOT.parents if (p / "shared" / "data").is_dir()),
    ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz",
)
WORK = Path("/tmp/dinokit-bench-knn")
T = 0.07
METHODS = {  # name: (implementation, the k computed)
    "dinokit, k=20": ("dinokit", (20,)),
    "dinokit, k=10,20,100,200 at once": ("dinokit", (10, 20, 100, 200)),
    "scikit-learn brute cosine, k=20": ("sklearn", (20,)),
}


def prepare_features() -> None:
    """CIFAR-10 -> features.npy files in WORK (extracting the JPEGs and the features once)."""
    import torch

    from dinokit.data.labelled import read_labelled
    from dinokit.data.transforms import eval_transform
    from dinokit.eval.cache import cached_features
    from dinokit.models import create_model

    if (WORK / "bank.npy").exists():
        return
    images = WORK / "cifar10"
    if not (images / "test").is_dir():
        if not TARBALL.exists():
            sys.exit(f"CIFAR-10 not found at {TARBALL}")
        images.mkdir(parents=True, exist_ok=True)
        with tarfile.open(TARBALL) as tar:
            tar.extractall(images, filter="data")
    torch.manual_seed(0)
    model = create_model("dinov2_vits14").eval()
    transform = eval_transform(56)
    for split, name in (("train", "bank"), ("test", "queries")):
        paths, labels, _ = read_labelled(images / split)
        feats = cached_features(
            model, paths, transform, ("cls",), cache_dir=Path("/tmp/dinokit-bench-cache"), batch_size=256, num_workers=2
        )
        np.save(WORK / f"{name}.npy", feats.array("cls"))
        np.save(WORK / f"{name}_labels.npy", np.asarray(labels)[feats.kept])


def peak_memory_reset() -> int:
    """Reset the kernel's peak-RSS counter of this process; return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss("VmRSS")


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(method: str) -> None:
    """Run one method once (in its own process) and print {"seconds", "peak_bytes"}; save predictions."""
    kind, ks = METHODS[method]
    bank, queries = np.load(WORK / "bank.npy"), np.load(WORK / "queries.npy")
    labels = np.load(WORK / "bank_labels.npy")
    if kind == "dinokit":
        import torch

        from dinokit.eval.knn import knn_classify

        bank_t, queries_t, labels_t = torch.from_numpy(bank), torch.from_numpy(queries), torch.from_numpy(labels)
        base = peak_memory_reset()
        start = time.perf_counter()
        scores = knn_classify(bank_t, labels_t, queries_t, 10, ks=ks, temperature=T)
        predictions = scores[20].argmax(1).numpy()
        seconds = time.perf_counter() - start
    else:
        from sklearn.neighbors import KNeighborsClassifier

        base = peak_memory_reset()
        start = time.perf_counter()
        weights = lambda d: np.exp((1 - d) / T)  # noqa: E731 (cosine distance d = 1 - similarity)
        clf = KNeighborsClassifier(n_neighbors=20, algorithm="brute", metric="cosine", weights=weights)
        predictions = clf.fit(bank, labels).predict(queries)
        seconds = time.perf_counter() - start
    np.save(WORK / f"pred_{kind}_{len(ks)}.npy", predictions)
    print(json.dumps({"seconds": seconds, "peak_bytes": rss("VmHWM") - base}))


def run(method: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", method], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    WORK.mkdir(parents=True, exist_ok=True)
    prepare_features()
    bank = np.load(WORK / "bank.npy", mmap_mode="r")
    queries = np.load(WORK / "queries.npy", mmap_mode="r")
    print(f"bank {bank.shape}, queries {queries.shape}, {args.repeats} repeats per method")
    rows = {}
    for method in METHODS:
        runs = [run(method) for _ in range(args.repeats)]
        rows[method] = {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "peak_mb": max(r["peak_bytes"] for r in runs) / 2**20,
        }
        print(f"{method:<34} {rows[method]['seconds']:8.2f} s  peak +{rows[method]['peak_mb']:7.0f} MB", flush=True)
    reference = rows["scikit-learn brute cosine, k=20"]["seconds"]
    sk = np.load(WORK / "pred_sklearn_1.npy")
    truth = np.load(WORK / "queries_labels.npy")
    print("\n| method | median s | peak MB | speed-up vs scikit-learn | k=20 predictions equal to scikit-learn |")
    print("|---|---|---|---|---|")
    for method, (kind, ks) in METHODS.items():
        pred = np.load(WORK / f"pred_{kind}_{len(ks)}.npy")
        same = int((pred == sk).sum())
        r = rows[method]
        print(
            f"| {method} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | {reference / r['seconds']:.1f}x | "
            f"{same}/{len(sk)} |"
        )
    print(f"\nk=20 top-1 accuracy of these features: {100 * (sk == truth).mean():.2f}%")


if __name__ == "__main__":
    main()
