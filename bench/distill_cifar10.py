"""Distillation (`distill_from=`) against self-distillation, for the same small student and updates.

A trained teacher run (e.g. `bench/learn_cifar10.py`'s `cpu32` run on CIFAR-10) is distilled into a
narrower student for `--iterations` steps on CIFAR-10 train (labels ignored); the same student, from
the same random init, is also pretrained on its own (self-distillation, the teacher run's preset) for
the same steps. Then weighted k-NN (k = 20, T = 0.07) of the 10k test images against the 50k train
images on the CLS features of: the teacher, both students, and the student at its random init.

    python bench/distill_cifar10.py --teacher /tmp/probe/c32                  # 1500 steps per student
    python bench/distill_cifar10.py --teacher RUN --iterations 3000 --width 64 --depth 4

Needs ../shared/data/cifar10-jpg.tar.gz beside the repository (or --data with train/ and test/).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from learn_cifar10 import cifar10, fresh_output  # noqa: E402

from dinokit.data.labelled import read_labelled  # noqa: E402
from dinokit.eval.knn import knn_top1  # noqa: E402
from dinokit.io import write_json  # noqa: E402
from dinokit.models import export_model, load_model  # noqa: E402
from dinokit.models.vision_transformer import VisionTransformer, ViTConfig  # noqa: E402
from dinokit.train.pretrain import pretrain  # noqa: E402


def student_init(path: Path, teacher_backbone, width: int, depth: int, heads: int) -> str:
    """A random-init student with the teacher's patch size and position grid, saved for init=."""
    torch.manual_seed(0)
    t = teacher_backbone.config
    config = ViTConfig(
        img_size=t.img_size, patch_size=t.patch_size, embed_dim=width, depth=depth, num_heads=heads, init_values=None
    )
    return export_model(VisionTransformer(config), path, format="dinokit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="a finished dinokit pretrain run folder")
    parser.add_argument("--iterations", type=int, default=1500, help="training steps of each student")
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/dinokit-bench/distill_cifar10"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    root = cifar10(args.data)
    train, train_labels, classes = read_labelled(root / "train")
    test, test_labels, _ = read_labelled(root / "test", classes=classes)
    data = dict(train=train, train_labels=train_labels, test=test, test_labels=test_labels, classes=classes)
    teacher_config = yaml.safe_load((args.teacher / "config.yaml").read_text())
    preset = teacher_config["preset"]
    teacher = load_model(args.teacher / "backbone.safetensors")
    fresh_output(args.out)
    init = student_init(args.out / "student_init.safetensors", teacher, args.width, args.depth, args.heads)
    keys = dict(
        data=str(root / "train"),
        preset=preset,
        init=init,
        max_iterations=args.iterations,
        epochs=0,
        max_minutes=0,
        checkpoint_every=0,
        progress=False,
        tensorboard=False,
    )
    print(
        f"teacher {args.teacher} ({teacher.embed_dim} wide, {len(teacher.blocks)} blocks, preset {preset}); "
        f"student {args.width} wide, {args.depth} blocks; {args.iterations} steps each"
    )
    runs = {}
    for name, extra in (("distilled", {"distill_from": str(args.teacher)}), ("self-distilled", {})):
        start = time.perf_counter()
        summary = pretrain(out=str(args.out / name), **keys, **extra)
        runs[name] = {"minutes": (time.perf_counter() - start) / 60, "backbone": summary["backbone"]}
        print(f"{name}: {summary['iterations']} iterations in {runs[name]['minutes']:.1f} min")
    size = 32
    results = {
        "teacher": knn_top1(teacher.eval(), data, size),
        "student, distilled": knn_top1(load_model(runs["distilled"]["backbone"]).eval(), data, size),
        "student, self-distilled": knn_top1(load_model(runs["self-distilled"]["backbone"]).eval(), data, size),
        "student, random init": knn_top1(load_model(init).eval(), data, size),
    }
    print(f"\n{'model':<26} {'k-NN top-1 % (k=20)':>20}")
    for name, top1 in results.items():
        print(f"{name:<26} {top1:>20.1f}")
    record = {
        "teacher": str(args.teacher),
        "iterations": args.iterations,
        "student": {"width": args.width, "depth": args.depth, "heads": args.heads},
        "knn_top1": results,
        "minutes": {k: v["minutes"] for k, v in runs.items()},
    }
    if args.json:
        write_json(args.json, record)


if __name__ == "__main__":
    main()
