"""End-to-end embedding speed: a folder of JPEGs -> CLS features on disk, ViT-S/14 at 224, three ways.

1. seed     the tutorial's extractor (seed section 4.2): one image at a time through a locally built
            transformers BitImageProcessor and Dinov2Model, fp32, features stacked and saved at the end
2. hf-batch transformers batched: the processor on lists of `batch_size` images and one model call
            per batch, fp32 (the straightforward fast way with transformers)
3. dinokit  `dinokit embed` (DataLoader workers decode/resize while the model runs, bf16 autocast,
            shards written atomically)

All three use the same weights (a randomly initialised dinov2_vits14, saved in the Hugging Face
layout; speed does not depend on the values) and the same transform (resize 256 bicubic, center crop
224, ImageNet normalisation). dinokit loads the weights with interpolate_offset=0.0, which is what
transformers' Dinov2Model computes at 224, so that features can be compared. The images are the first
`--images` CIFAR-10 test pictures resized to 224x224 JPEGs (so that decoding costs what a real photo
collection costs). `--device cuda` runs all three models on the GPU (the images are decoded on the CPU
as before; on a GPU the seed's per-image loop is bound by its preprocessing and launches). Each way runs
`--repeats` times, alternating; medians and ratios are printed, plus the cosine similarity between
dinokit's (bf16) features and transformers' fp32 ones.

Run under the shared lock:  flock /tmp/dinokit-heavy.lock .venv/bin/python bench/embed.py
"""

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import dinokit  # noqa: E402
from dinokit.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from dinokit.features.embed import embed  # noqa: E402
from dinokit.features.store import read_embeddings  # noqa: E402
from dinokit.io import write_json  # noqa: E402

# ../shared beside the checkout (CI, /work/main); a worktree one level deeper finds it one level up; a
# shared/ inside the checkout (git-ignored) is what travels to a lent GPU machine (bench/cuda_checks.sh embed)
ARCHIVES = [base / "shared" / "data" / "cifar10-jpg.tar.gz" for base in (ROOT.parent, ROOT.parent.parent, ROOT)]


def prepare_images(count: int, folder: Path) -> list[Path]:
    """The first `count` CIFAR-10 test images (sorted by member name), upsampled to 224x224 JPEGs."""
    archive = next((a for a in ARCHIVES if a.is_file()), None)
    if archive is None:
        raise SystemExit(f"CIFAR-10 JPEG archive not found (looked for {', '.join(map(str, ARCHIVES))})")
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.jpg"))
    if len(existing) >= count:
        return existing[:count]
    with tarfile.open(archive) as tar:
        members = sorted(
            (m for m in tar.getmembers() if "test/" in m.name and m.name.endswith(".jpg")), key=lambda m: m.name
        )
        for i, member in enumerate(members[:count]):
            with tar.extractfile(member) as f:
                image = Image.open(f).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
            image.save(folder / f"{i:05d}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))[:count]


def bit_image_processor():
    """The facebook/dinov2-* preprocessor, built locally (no download)."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


@torch.inference_mode()
def run_seed(model, processor, paths: list[Path], out: Path, device: str) -> np.ndarray:
    """Seed 4.2: per image, processor -> model (on `device`) -> CLS, then np.vstack and save."""
    features = []
    for path in paths:
        inputs = processor(images=Image.open(path), return_tensors="pt").to(device)
        features.append(model(**inputs).last_hidden_state[:, 0].cpu().numpy())
    features = np.vstack(features)
    np.save(out, features)
    return features


@torch.inference_mode()
def run_hf_batched(model, processor, paths: list[Path], out: Path, batch_size: int, device: str) -> np.ndarray:
    features = []
    for start in range(0, len(paths), batch_size):
        images = [Image.open(p) for p in paths[start : start + batch_size]]
        inputs = processor(images=images, return_tensors="pt").to(device)
        features.append(model(**inputs).last_hidden_state[:, 0].cpu().numpy())
    features = np.vstack(features)
    np.save(out, features)
    return features


def run_dinokit(weights: str, folder: Path, out: Path, batch_size: int, num_workers: int, device: str) -> np.ndarray:
    embed(
        weights,
        str(folder),
        str(out),
        image_size=224,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        precision="bf16",
        progress=False,
    )
    return read_embeddings(out, ["cls"])[0]["cls"].numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where all three ways run their model")
    parser.add_argument("--work", default="/tmp/dinokit-bench-embed")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from transformers import Dinov2Model

    work = Path(args.work)
    images = work / f"cifar10-test-224-{args.images}"
    paths = prepare_images(args.images, images)
    torch.manual_seed(0)
    hf_folder = dinokit.export_model(dinokit.create_model("dinov2_vits14"), work / "vits14_hf", format="hf")
    # same weights for dinokit, with transformers' position-embedding interpolation at 224
    weights = dinokit.export_model(dinokit.load_model(hf_folder, interpolate_offset=0.0), work / "vits14.safetensors")
    hf_model = Dinov2Model.from_pretrained(hf_folder).eval().to(args.device)
    processor = bit_image_processor()
    print(
        f"{len(paths)} JPEGs 224x224 on {args.device}, torch threads {torch.get_num_threads()}, "
        f"batch {args.batch_size}, dinokit num_workers {args.num_workers}, "
        f"transformers attn {hf_model.config._attn_implementation}"
    )

    times = {"seed": [], "hf-batch": [], "dinokit": []}
    outputs = {}
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            tmp = Path(tmp)
            for name in times:
                start = time.perf_counter()
                if name == "seed":
                    outputs[name] = run_seed(hf_model, processor, paths, tmp / "seed.npy", args.device)
                elif name == "hf-batch":
                    outputs[name] = run_hf_batched(
                        hf_model, processor, paths, tmp / "hf.npy", args.batch_size, args.device
                    )
                else:
                    outputs[name] = run_dinokit(
                        weights, images, tmp / "dinokit", args.batch_size, args.num_workers, args.device
                    )
                times[name].append(time.perf_counter() - start)
                print(f"repeat {r + 1} {name:<9} {len(paths) / times[name][-1]:7.1f} images/s")

    rate = {name: len(paths) / statistics.median(t) for name, t in times.items()}
    per_repeat = {  # ratios within each repeat: the ways ran back to back, under the same machine load
        "dinokit_vs_seed": [s / d for s, d in zip(times["seed"], times["dinokit"], strict=True)],
        "dinokit_vs_hf_batch": [h / d for h, d in zip(times["hf-batch"], times["dinokit"], strict=True)],
    }
    cos_dinokit = cosine(outputs["dinokit"], outputs["hf-batch"])
    cos_seed = cosine(outputs["seed"], outputs["hf-batch"])
    results = {
        "images": len(paths),
        "images_per_s_median": {k: round(v, 2) for k, v in rate.items()},
        "dinokit_vs_seed": round(rate["dinokit"] / rate["seed"], 2),
        "dinokit_vs_hf_batch": round(rate["dinokit"] / rate["hf-batch"], 2),
        "hf_batch_vs_seed": round(rate["hf-batch"] / rate["seed"], 2),
        "per_repeat_ratios": {k: [round(r, 2) for r in v] for k, v in per_repeat.items()},
        "cosine_dinokit_bf16_vs_hf_fp32_min": float(cos_dinokit.min()),
        "cosine_dinokit_bf16_vs_hf_fp32_mean": float(cos_dinokit.mean()),
        "cosine_seed_vs_hf_batch_min": float(cos_seed.min()),
    }
    print(json.dumps(results, indent=2))
    met = {
        ">= 5x seed": results["dinokit_vs_seed"] >= 5,
        ">= 2x hf-batch": results["dinokit_vs_hf_batch"] >= 2,
        "cosine >= 0.999": results["cosine_dinokit_bf16_vs_hf_fp32_min"] >= 0.999,
    }
    print("targets met:", ", ".join(f"{k}: {v}" for k, v in met.items()))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
