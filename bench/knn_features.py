"""k-NN accuracy of one backbone on CIFAR-10 by which feature the search reads: CLS, mean patch
token, both concatenated, and the CLS of the last blocks concatenated, at one or more image sizes.

The protocol of bench/learn_cifar10.py (weighted k-NN, k = 20, T = 0.07, 10k test images against the
50k training images; `dinokit.eval.knn`), on features from
`dinokit.features.extract.extract_features(which=("cls", "patch_mean", "layers"))`. Each feature is
L2-normalised before it is concatenated with another.

    PYTHONPATH=src flock /tmp/dinokit-heavy.lock .venv/bin/python bench/knn_features.py \\
        /tmp/dinokit-bench/learn_cifar10/dinokit/backbone.safetensors --sizes 32 48

Needs CIFAR-10 extracted as DATA/train and DATA/test (bench/learn_cifar10.py extracts it to
/tmp/cifar10).
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from dinokit import load_model
from dinokit.data.labelled import read_labelled
from dinokit.data.transforms import eval_transform
from dinokit.eval.knn import knn_classify, topk_accuracy
from dinokit.features.extract import extract_features


def concat(features: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([F.normalize(features[k], dim=-1) for k in keys], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a backbone file dinokit.load_model reads")
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[32])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    depth = len(model.blocks)
    train, train_labels, classes = read_labelled(args.data / "train")
    test, test_labels, _ = read_labelled(args.data / "test", classes=classes)

    def top1(bank: torch.Tensor, queries: torch.Tensor) -> float:
        scores = knn_classify(bank, torch.tensor(train_labels), queries, len(classes), ks=(20,), temperature=0.07)
        return topk_accuracy(scores[20], torch.tensor(test_labels))

    print("| feature | " + " | ".join(f"{s} px" for s in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    table: dict[str, list[float]] = {}
    for size in args.sizes:
        options = dict(batch_size=256, num_workers=0, progress=False, which=("cls", "patch_mean", "layers"))
        transform = eval_transform(size, resize_policy="resize")
        bank, _, _ = extract_features(model, train, transform, layers=list(range(depth)), **options)
        queries, _, _ = extract_features(model, test, transform, layers=list(range(depth)), **options)
        rows = {
            "CLS": top1(bank["cls"], queries["cls"]),
            "mean patch token": top1(bank["patch_mean"], queries["patch_mean"]),
            "CLS + mean patch token": top1(concat(bank, ["cls", "patch_mean"]), concat(queries, ["cls", "patch_mean"])),
        }
        for first in range(depth - 2, -1, -1):  # the last 2, 3, ... blocks
            bank_last, queries_last = (F.normalize(f["layers"][:, first:], dim=-1).flatten(1) for f in (bank, queries))
            rows[f"CLS of the last {depth - first} blocks"] = top1(bank_last, queries_last)
        for name, value in rows.items():
            table.setdefault(name, []).append(value)
    for name, values in table.items():
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")


if __name__ == "__main__":
    main()
