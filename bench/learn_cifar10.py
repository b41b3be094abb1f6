"""How much a fixed CPU budget of self-supervised pretraining learns: CIFAR-10, dinokit vs lightly.

1. dinokit: `dinokit.pretrain` on CIFAR-10 train (50k images, labels ignored), preset `cpu32`, for
   `--minutes` of training wall clock (data loading included; the preset's augmentation=batched first
   decodes the 50k images into memory, about 10 s, which the table reports as set-up time).
2. lightly: its DINO recipe (`benchmarks/imagenet/vitb16/dino.py`: DINOTransform, DINOProjectionHead,
   DINOLoss, AdamW with lr 0.0005 x batch / 256, weight decay 0.04 -> 0.4, teacher momentum
   0.996 -> 1, teacher temperature 0.04, 10% warm-up, cosine schedules over the budget) on the same
   backbone (a timm ViT with the preset's width, depth, heads and patch size, wrapped in
   MaskedVisionTransformerTIMM), 2 x 32 + 6 x 16 crops, batch 64, 4096 prototypes, bf16, for the
   same budget.
3. Weighted k-NN (k = 20, T = 0.07; `dinokit.eval.knn`) of the 10k test images against the 50k
   training images, on the CLS feature of each teacher, of the same network at random init, and of
   raw pixels.

    python bench/learn_cifar10.py                 # 15 minutes each (about 40 minutes in all)
    python bench/learn_cifar10.py --minutes 2     # a short validation run
    python bench/learn_cifar10.py --minutes 5 --skip-lightly --skip-baselines --set lr=0.001   # a probe
    python bench/learn_cifar10.py --skip-lightly --skip-baselines --seeds 0 1 2   # dinokit over 3 seeds

One run's k-NN moves by about 3 points with the seed alone (docs/benchmarks.md), so `--seeds` trains
dinokit once per seed and reports each run and their mean (the lightly comparison uses the mean).

Needs ../shared/data/cifar10-jpg.tar.gz beside the repository (or --data with train/ and test/).
"""

import argparse
import copy
import shutil
import sys
import tarfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from dinokit.data.images import list_images, open_rgb  # noqa: E402
from dinokit.data.labelled import read_labelled  # noqa: E402
from dinokit.demo import raw_pixel_top1  # noqa: E402
from dinokit.eval.knn import knn_top1  # noqa: E402
from dinokit.io import write_json  # noqa: E402
from dinokit.models import load_model  # noqa: E402
from dinokit.train.build import build_backbone  # noqa: E402
from dinokit.train.config import resolve_config  # noqa: E402
from dinokit.train.pretrain import pretrain  # noqa: E402

ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def cifar10(root: Path) -> Path:
    """root with train/<class>/*.jpg and test/<class>/*.jpg, extracted from the shared archive."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    if not ARCHIVE.exists():
        sys.exit(f"CIFAR-10 not found: {ARCHIVE} (or pass --data DIR with train/ and test/)")
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(root, filter="data")
    return root


# ---------------------------------------------------------------------------------------------- lightly
class LightlyBackbone(torch.nn.Module):
    """A lightly backbone seen through dinokit's feature interface (forward_features -> CLS)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward_features(self, images: torch.Tensor) -> dict:
        return {"x_norm_clstoken": self.backbone(images)}


BENCH_MARK = ".dinokit-bench"  # in every --out folder a bench made: only such a folder is emptied


def fresh_output(folder: Path) -> None:
    """Empty `folder` for a new run, if a bench made it (or it is empty); refuse anyone else's folder."""
    if folder.exists():
        if any(folder.iterdir()) and not (folder / BENCH_MARK).exists():
            sys.exit(f"--out {folder} holds files this benchmark did not write: pass a new or empty folder")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / BENCH_MARK).touch()


def train_lightly(
    train_dir: Path, minutes: float, arch, batch_size: int, num_workers: int
) -> tuple[torch.nn.Module, dict]:
    """lightly's DINO recipe for `minutes` of wall clock; returns (teacher backbone, summary)."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import get_weight_decay_parameters, update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32,
        patch_size=arch.patch_size,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        dynamic_img_size=True,
    )
    teacher = MaskedVisionTransformerTIMM(vit=vit)
    student = copy.deepcopy(teacher)
    teacher_head = DINOProjectionHead(input_dim=arch.embed_dim, output_dim=4096, norm_last_layer=False)
    student_head = DINOProjectionHead(
        input_dim=arch.embed_dim, output_dim=4096, norm_last_layer=False, freeze_last_layer=1
    )
    student_head.load_state_dict(teacher_head.state_dict())
    for m in (teacher, teacher_head):
        m.requires_grad_(False)
    criterion = DINOLoss(output_dim=4096, warmup_teacher_temp=0.04, teacher_temp=0.04)
    transform = DINOTransform(global_crop_size=32, local_crop_size=16, n_local_views=6)

    class Views(torch.utils.data.Dataset):
        def __init__(self, paths):
            self.paths = paths

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            return transform(open_rgb(self.paths[i]))

    loader = torch.utils.data.DataLoader(
        Views(list_images(train_dir)),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    params, params_no_wd = get_weight_decay_parameters([student, student_head])
    lr = 0.0005 * batch_size / 256
    optimizer = torch.optim.AdamW(
        [{"params": params, "weight_decay": 0.04}, {"params": params_no_wd, "weight_decay": 0.0}], lr=lr
    )
    start, step, budget = time.perf_counter(), 0, 60.0 * minutes
    student.train()
    student_head.train()
    done = False
    while not done:
        for views in loader:
            progress = (time.perf_counter() - start) / budget
            if progress >= 1.0:
                done = True
                break
            momentum = cosine_schedule(int(1000 * progress), 1000, 0.996, 1.0)
            update_momentum(student, teacher, m=momentum)
            update_momentum(student_head, teacher_head, m=momentum)
            warm = min(progress / 0.1, 1.0)
            lr_now = lr * warm if progress < 0.1 else cosine_schedule(int(1000 * (progress - 0.1) / 0.9), 1000, lr, 0.0)
            optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = lr_now
            optimizer.param_groups[0]["weight_decay"] = cosine_schedule(int(1000 * progress), 1000, 0.04, 0.4)
            global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.no_grad():
                    teacher_out = teacher_head(teacher(global_views))
                student_out = torch.cat([student_head(student(global_views)), student_head(student(local_views))])
                loss = criterion(
                    teacher_out=teacher_out.chunk(2), student_out=student_out.chunk(len(views)), teacher_temp=0.04
                )
            loss.backward()
            student_head.cancel_last_layer_gradients(current_epoch=int(progress * 100))  # first 1% of the run
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    seconds = time.perf_counter() - start
    summary = {
        "iterations": step,
        "epochs": step * batch_size / len(loader.dataset),
        "minutes": seconds / 60,
        "img_per_s": step * batch_size / seconds,
        "last_loss": loss.item(),
    }
    return LightlyBackbone(teacher.eval()), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget of each library")
    parser.add_argument("--preset", default="cpu32")
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/dinokit-bench/learn_cifar10"))
    parser.add_argument("--skip-lightly", action="store_true")
    parser.add_argument("--skip-dinokit", action="store_true", help="only the lightly run and the baselines")
    parser.add_argument("--skip-baselines", action="store_true", help="no random-init or raw-pixel k-NN (probes)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="dinokit runs, one per seed (default: the preset's seed)"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="override preset keys, e.g. --set lr=0.001"
    )
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)

    root = cifar10(args.data)
    train, train_labels, classes = read_labelled(root / "train")
    test, test_labels, _ = read_labelled(root / "test", classes=classes)
    data = dict(train=train, train_labels=train_labels, test=test, test_labels=test_labels, classes=classes)
    fresh_output(args.out)
    cfg = resolve_config(args.preset, overrides)
    arch = build_backbone(cfg).config
    results = {"minutes": args.minutes, "preset": args.preset, "overrides": overrides, "arch": cfg.arch}
    print(
        f"CIFAR-10: {len(train)} train / {len(test)} test images; budget {args.minutes} min per library; "
        f"backbone {cfg.arch} ({arch.embed_dim}/{arch.depth}/{arch.num_heads}, patch {arch.patch_size})"
    )

    if not args.skip_dinokit:
        runs = {}
        for seed in args.seeds or [cfg.seed]:
            name = "dinokit" if args.seeds is None else f"dinokit_seed{seed}"
            runs[seed] = train_dinokit(
                root, args.out / name, args.preset, args.minutes, {**overrides, "seed": seed}, data
            )
            print(
                f"dinokit seed {seed}: {runs[seed]['iterations']} iterations, {runs[seed]['epochs']} epochs -> "
                f"k-NN {runs[seed]['knn_top1']:.2f}%"
            )
        results["dinokit_seeds"] = runs
        results["dinokit"] = {  # the mean over the seeds (the one run without --seeds)
            key: sum(run[key] for run in runs.values()) / len(runs)
            for key in ("knn_top1", "iterations", "epochs", "training_minutes", "wall_minutes")
        }
    if not args.skip_baselines:
        torch.manual_seed(cfg.seed)
        results["random_init_knn_top1"] = knn_top1(build_backbone(cfg), data, 32)
        results["raw_pixels_knn_top1"] = raw_pixel_top1(data, 32)
    if not args.skip_lightly:
        started = time.perf_counter()
        teacher, lightly_summary = train_lightly(root / "train", args.minutes, arch, 64, cfg.num_workers)
        lightly_summary["wall_minutes"] = (time.perf_counter() - started) / 60
        results["lightly"] = {**lightly_summary, "knn_top1": knn_top1(teacher, data, 32)}
        print(
            f"lightly: {lightly_summary['iterations']} iterations, {lightly_summary['epochs']:.3f} epochs -> "
            f"k-NN {results['lightly']['knn_top1']:.2f}%"
        )
    write_json(args.out / "results.json", results)

    print("\n| method | k-NN top-1 (k=20) | iterations | epochs in budget | wall minutes (with set-up) |")
    print("|---|---|---|---|---|")
    if "dinokit" in results:
        rows = [(f"seed {seed}", run) for seed, run in results["dinokit_seeds"].items()]
        if len(rows) > 1:
            rows.append((f"mean of {len(rows)} seeds", results["dinokit"]))
        for label, run in rows:
            print(
                f"| dinokit `{args.preset}`, {label} | {run['knn_top1']:.1f} | {run['iterations']:.0f} | "
                f"{run['epochs']:.2f} | {run['wall_minutes']:.2f} |"
            )
    if "lightly" in results:
        theirs = results["lightly"]
        print(
            f"| lightly DINO, same backbone | {theirs['knn_top1']:.1f} | {theirs['iterations']} | "
            f"{theirs['epochs']:.2f} | {theirs['wall_minutes']:.2f} |"
        )
    if not args.skip_baselines:
        print(f"| same network, random init | {results['random_init_knn_top1']:.1f} | - | - | - |")
        print(f"| raw pixels | {results['raw_pixels_knn_top1']:.1f} | - | - | - |")
    if "lightly" in results and "dinokit" in results:
        gap = results["dinokit"]["knn_top1"] - results["lightly"]["knn_top1"]
        print(f"\ndinokit - lightly: {gap:+.1f} points")


def train_dinokit(root: Path, out: Path, preset: str, minutes: float, overrides: dict, data: dict) -> dict:
    """One dinokit pretraining run of `minutes` on root/train, then its k-NN: the summary figures."""
    started = time.perf_counter()
    summary = pretrain(
        data=str(root / "train"),
        out=str(out),
        preset=preset,
        max_minutes=minutes,
        epochs=0,
        progress=False,
        **overrides,
    )
    wall = (time.perf_counter() - started) / 60
    return {
        "knn_top1": knn_top1(load_model(out / "backbone.safetensors"), data, 32),
        "iterations": summary["iterations"],
        "epochs": summary["epochs"],
        "training_minutes": summary["minutes"],
        "wall_minutes": wall,  # set-up (model, data decoding), training and saving
    }


if __name__ == "__main__":
    main()
