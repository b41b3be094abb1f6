"""`make demo`: self-supervised pretraining end to end on a small CPU, with proof that it learned.

1. Data: without `data=`, renders a labelled set of object-centred shape images
   (`dinokit.data.synthetic` scenes cropped around their one shape: 8 shapes in random colours on
   random striped backgrounds; nothing is downloaded), a training split and a held-out test split.
   With `data=FOLDER`: a `<class>/<images>` folder is split per class (every 5th image held out);
   any other folder is used whole, without labels.
2. Pretrains (`dinokit.pretrain`, preset `demo`) on the training images, labels ignored, for a fixed
   wall-clock budget.
3. Compares the learned teacher backbone with the same network at its random initialisation (the
   run's own starting weights): weighted k-NN (k = 20, T = 0.07; `dinokit.eval.knn`) of held-out
   images against the training images, with raw pixels for scale; and, with or without labels,
   view retrieval: how often the feature of one augmented view of a held-out image finds the other
   view of the same image among all of them.
4. Writes `report.md` and `loss.png` to `out`.
"""

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.data.images import list_images, open_rgb
from dinokit.data.labelled import read_labelled
from dinokit.data.synthetic import SHAPES, render_scene
from dinokit.errors import DinokitError
from dinokit.eval.knn import knn_classify, knn_top1, topk_accuracy
from dinokit.io import atomic_folder, atomic_write, refuse_files_no_run_wrote
from dinokit.models import load_model
from dinokit.train.config import resolve_config
from dinokit.train.metrics_log import read_metrics
from dinokit.train.pretrain import pretrain

SYNTHETIC = {"train_per_class": 300, "test_per_class": 100, "size": 32}


def write_object_set(root: Path, per_class: int, size: int, seed: int, split: str) -> Path:
    """`root/<split>/<shape>/<i>.png`: object-centred views of rendered scenes (one shape each, drawn at
    twice `size`), cropped to a square around the shape's mask with a random margin and resized to
    `size`, as in photo datasets like CIFAR where the object fills most of the frame."""
    rng = np.random.default_rng(seed)
    for kind in SHAPES:
        (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            scene = render_scene(rng, 2 * size, num_shapes=1, shapes=(kind,))
            ys, xs = np.nonzero(scene.mask)
            cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
            half = min(max(ys.max() - ys.min(), xs.max() - xs.min()) / 2 * rng.uniform(1.2, 1.6) + 1, size)
            cy, cx = np.clip(cy, half, 2 * size - half), np.clip(cx, half, 2 * size - half)  # inside the scene
            box = [cx - half, cy - half, cx + half, cy + half]
            image = Image.fromarray(scene.image).resize((size, size), Image.Resampling.BICUBIC, box=box)
            atomic_write(root / split / kind / f"{i:05d}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
    return root / split


def prepare_data(out: Path, data: str | None) -> dict:
    """{"train": paths, "test": paths, "train_labels", "test_labels" (None without labels), "classes",
    "source"}; the training paths are also written to out/train_images.txt for `pretrain`."""
    if data is None:
        root = out / "shapes"
        if not root.is_dir():  # rendered whole or not at all: a demo stopped meanwhile renders them again
            with atomic_folder(root) as tmp:
                write_object_set(tmp, SYNTHETIC["train_per_class"], SYNTHETIC["size"], seed=0, split="train")
                write_object_set(tmp, SYNTHETIC["test_per_class"], SYNTHETIC["size"], seed=1, split="test")
        train, train_labels, classes = read_labelled(root / "train")
        test, test_labels, _ = read_labelled(root / "test", classes=classes)
        source = f"rendered shapes, object-centred ({len(SHAPES)} classes, {SYNTHETIC['size']} px), {root}"
    else:
        try:
            paths, labels, classes = read_labelled(data)
        except DinokitError:
            paths, labels, classes = [], [], []
        if len(classes) >= 2:
            held_out = [i for c in range(len(classes)) for i in [j for j, y in enumerate(labels) if y == c][4::5]]
            held = set(held_out)
            train = [p for i, p in enumerate(paths) if i not in held]
            train_labels = [y for i, y in enumerate(labels) if i not in held]
            test, test_labels = [paths[i] for i in held_out], [labels[i] for i in held_out]
            source = f"{data} ({len(classes)} classes from its <class>/ folders; every 5th image per class held out)"
        else:
            images = list_images(data)
            train, test, train_labels, test_labels, classes = images, images[::5][:500], None, None, []
            source = f"{data} (no <class>/ folders: no labels; view retrieval on every 5th image)"
    out.mkdir(parents=True, exist_ok=True)
    listing = out / "train_images.txt"
    text = "".join(f"{Path(p).resolve()}\n" for p in train)
    atomic_write(listing, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return dict(
        train=train,
        test=test,
        train_labels=train_labels,
        test_labels=test_labels,
        classes=classes,
        source=source,
        listing=listing,
    )


def raw_pixel_top1(data: dict, size: int) -> float:
    """The same k-NN on raw pixels (images resized to `size` and normalised, flattened)."""
    from dinokit.data.transforms import eval_transform

    transform = eval_transform(size, resize_policy="resize")

    def pixels(paths):
        return torch.stack([transform(open_rgb(p)).flatten() for p in paths])

    bank, queries = pixels(data["train"]), pixels(data["test"])
    labels = torch.tensor(data["train_labels"])
    scores = knn_classify(bank, labels, queries, len(data["classes"]), ks=(20,), temperature=0.07)
    return topk_accuracy(scores[20], torch.tensor(data["test_labels"]))


@torch.no_grad()
def view_retrieval(model, paths: list, size: int, seed: int = 0) -> float:
    """Percent of held-out images whose second augmented view is the nearest neighbour (cosine) of
    the first view's CLS feature, among the second views of all of them."""
    from dinokit.data.augmentations import MultiCropAugmentation
    from dinokit.data.transforms import normalize

    augment = MultiCropAugmentation(size, size, local_crops_number=0, global_crops_scale=(0.3, 1.0))
    to_float = normalize()
    views = [[], []]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in paths:
            crops = augment(open_rgb(p))["global_crops"]
            for i in (0, 1):
                views[i].append(to_float(crops[i]))
    model.eval()
    a, b = (F.normalize(model(torch.stack(v)), dim=-1) for v in views)
    hits = (a @ b.T).argmax(dim=1) == torch.arange(len(paths))
    return 100.0 * hits.float().mean().item()


def knn_monitor_keys(out: Path, data: dict, size: int) -> dict:
    """pretrain keys for its k-NN monitor on the demo's labelled split (path,label CSVs written to
    `out`), evaluated as the report's table is (resize to `size`): none without labels."""
    if data["train_labels"] is None:
        return {}
    files = {}
    for side, split in (("train", "train"), ("val", "test")):
        pairs = zip(data[split], data[f"{split}_labels"], strict=True)
        lines = "".join(f"{Path(p).resolve()},{data['classes'][y]}\n" for p, y in pairs)
        files[side] = out / f"knn_{side}.csv"
        atomic_write(files[side], lambda tmp, text=lines: Path(tmp).write_text(text, encoding="utf-8"))
    return {
        "knn_every": 400,
        "knn_train": str(files["train"]),
        "knn_val": str(files["val"]),
        "knn_image_size": size,
        "knn_resize_policy": "resize",
    }


def plot_losses(rows: list[dict], path: Path, knn_rows: list[dict] = (), references: dict | None = None) -> None:
    """The losses over the iterations; beside them, where the k-NN monitor ran, its top-1 with the
    `references` ({label: top-1}, e.g. random init, raw pixels) as horizontal lines."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend and figures stay as they were

    fig = Figure(figsize=(11 if knn_rows else 6, 3.5))
    axes = fig.subplots(1, 2 if knn_rows else 1, squeeze=False)
    ax = axes[0, 0]
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
        if key in rows[-1]:
            ax.plot([r["iteration"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("pretraining losses")
    if knn_rows:
        ax = axes[0, 1]
        ax.plot([r["iteration"] for r in knn_rows], [r["knn_top1"] for r in knn_rows], "o-", label="teacher")
        for (label, value), style in zip((references or {}).items(), (":", "--", "-."), strict=False):
            ax.axhline(value, linestyle=style, color="grey", label=label)
        ax.set_xlabel("iteration")
        ax.set_ylabel("k-NN top-1 %")
        ax.legend()
        ax.set_title("k-NN on held-out images (k=20)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# What the demo writes in its out folder beside run/ (its pretraining run, made before any of them)
DEMO_FILES = ("report.md", "loss.png", "train_images.txt", "knn_train.csv", "knn_val.csv")


def claim_demo_folder(out: Path) -> None:
    """Refuse, before any work, an `out` holding files of the demo's names (DEMO_FILES) but no run/
    folder, which the demo makes first: files of the user's (out=. in a project) that it would
    replace. Then make run/, marking `out` as the demo's (for a rerun, an interrupted one included)."""
    refuse_files_no_run_wrote(out, DEMO_FILES, ("run",), "dinokit demo")
    (out / "run").mkdir(parents=True, exist_ok=True)


def demo(
    out: str = "out/demo",
    data: str | None = None,
    minutes: float | None = None,
    preset: str = "demo",
    num_workers: int | None = None,
    image_size: int = SYNTHETIC["size"],
) -> str:
    """Pretrain on rendered shapes (or data=FOLDER), then compare its k-NN with the same network at random init.

    Trains for `minutes` (default: the preset's max_minutes), then shows with k-NN that the features
    beat the same network at random init; writes out/report.md and out/loss.png. image_size: the side
    that images are resized to for the evaluation (the rendered shapes' size; training crops may be
    smaller)."""
    from dinokit.train.build import build_backbone

    start = time.perf_counter()
    out_dir = Path(out).expanduser()  # "~/demo" from Python (a shell expands it on the command line)
    claim_demo_folder(out_dir)
    data_info = prepare_data(out_dir, data)
    print(f"demo: {len(data_info['train'])} training images, {len(data_info['test'])} held out: {data_info['source']}")
    run_dir = out_dir / "run"
    keys = {"max_minutes": minutes, "num_workers": num_workers, **knn_monitor_keys(out_dir, data_info, image_size)}
    summary = pretrain(
        data=str(data_info["listing"]),
        out=str(run_dir),
        preset=preset,
        resume=True,
        **{k: v for k, v in keys.items() if v is not None},
    )
    cfg = resolve_config(preset, {})
    learned = load_model(run_dir / "backbone.safetensors").eval()
    torch.manual_seed(cfg.seed)  # the run's starting weights (the trainer seeds the same way)
    random_init = build_backbone(cfg).eval()

    results = {}
    if data_info["train_labels"] is not None:
        print("demo: k-NN evaluation")
        results["k-NN top-1 (k=20), learned"] = knn_top1(learned, data_info, image_size)
        results["k-NN top-1 (k=20), same network at random init"] = knn_top1(random_init, data_info, image_size)
        results["k-NN top-1 (k=20), raw pixels"] = raw_pixel_top1(data_info, image_size)
    retrieval_paths = data_info["test"][:500]
    results["view retrieval top-1, learned"] = view_retrieval(learned, retrieval_paths, image_size)
    results["view retrieval top-1, same network at random init"] = view_retrieval(
        random_init, retrieval_paths, image_size
    )

    rows = read_metrics(run_dir / "metrics.jsonl")
    knn_rows = [r for r in rows if "knn_top1" in r]
    rows = [r for r in rows if "loss" in r]  # training rows (the k-NN monitor's have their own)
    references = {k.split(", ")[-1]: v for k, v in results.items() if k.startswith("k-NN") and "learned" not in k}
    plot_losses(rows, out_dir / "loss.png", knn_rows, references)
    last = rows[-1]
    key = "k-NN top-1 (k=20)" if data_info["train_labels"] is not None else "view retrieval top-1"
    gain = results[f"{key}, learned"] - results[f"{key}, same network at random init"]
    verdict = "beat" if gain > 0 else "did NOT beat"
    report = [
        "# dinokit demo: self-supervised pretraining on a CPU",
        "",
        f"Data: {data_info['source']}: {len(data_info['train'])} training images (labels ignored while "
        f"pretraining), {len(data_info['test'])} held out.",
        f"Pretraining: preset `{preset}` ({cfg.objective}, {cfg.arch}, "
        f"{cfg.global_crops_number}x{cfg.global_crops_size} + {cfg.local_crops_number}x{cfg.local_crops_size} "
        f"crops, batch {cfg.batch_size}), {summary['iterations']} "
        f"iterations = {summary['epochs']} epochs in {summary['minutes']} min, {last['img_per_s']:.0f} img/s, "
        f"data wait {100 * last['data_wait']:.0f}%.",
        f"Last losses: total {last['loss']:.3f}, DINO {last['dino_loss']:.3f}; health: teacher entropy "
        f"{last['teacher_entropy']:.2f}, KL to uniform {last['teacher_kl_uniform']:.3f}, "
        f"CLS spread {last['cls_spread']:.2f}.",
        "",
        f"| evaluation on held-out images ({image_size} px) | top-1 % |",
        "|---|---|",
        *[f"| {name} | {value:.1f} |" for name, value in results.items()],
        "",
        f"The learned features {verdict} the same network at random init by {gain:+.1f} points ({key}).",
        *(
            [
                f"Raw pixels score higher ({results['k-NN top-1 (k=20), raw pixels']:.1f}%): this short CPU run lifts "
                "the network above its random start, not yet above matching pixels."
            ]
            if "k-NN top-1 (k=20), raw pixels" in results
            and results["k-NN top-1 (k=20), raw pixels"] > results["k-NN top-1 (k=20), learned"]
            else []
        ),
        "",
        "![losses and k-NN over training](loss.png)",
        "",
        f"Run folder: `{run_dir}` (config.yaml, metrics.jsonl, tensorboard/, checkpoints/, backbone.safetensors). "
        f"Total demo time {(time.perf_counter() - start) / 60:.1f} min.",
    ]
    text = "\n".join(report) + "\n"
    atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print("\n".join(f"{name}: {value:.1f}%" for name, value in results.items()))
    print(f"demo: learned features {verdict} random init by {gain:+.1f} points; report: {out_dir / 'report.md'}")
    return str(out_dir / "report.md")
