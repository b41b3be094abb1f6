"""Decoding large JPEGs for a 224 px model input: whole, or at a reduced scale (`ReducedJpegDecode`).

Photos from a phone or camera are 12 megapixels and more; every eval and embed command shrinks them to
256 px before the model sees them. Decoding the whole file is then most of the data loading:
`ReducedJpegDecode` (the first step of `eval_transform`) lets libjpeg decode at 1/2, 1/4 or 1/8 scale
while both sides stay at least twice the resize's. This script times decode + eval transform per image
both ways, in one process, alternating, on four of scikit-image's photos enlarged to WIDTH x HEIGHT
(with pixel noise, so that the JPEGs hold detail at full size), and compares a randomly initialised
ViT-S/14's CLS on the two inputs. Then the same for pretraining: one item of the per-image dataset
(decode + DINOv2's 2 x 224 + 8 x 98 px multi-crop), decoded whole or at `crops_min_side`.

    flock /tmp/dinokit-heavy.lock .venv/bin/python bench/jpeg_decode.py            # 4000 x 3000
    .venv/bin/python bench/jpeg_decode.py --size 6000 4000 --rounds 5
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import dinokit
from dinokit.data.images import decode_min_side, open_rgb
from dinokit.data.transforms import eval_transform
from dinokit.data.unlabelled import MultiCropDataset
from dinokit.train.build import build_augmentation
from dinokit.train.config import resolve_config

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def write_photos(folder: Path, width: int, height: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert("RGB").resize((width, height), Image.BICUBIC)
        noisy = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
        paths.append(folder / f"{name}.jpg")
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=(4000, 3000), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in one DataLoader worker
    modes = {"whole": eval_transform(224, reduced_decode=False), "reduced": eval_transform(224)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp), *args.size)
        times: dict[str, list[float]] = {m: [] for m in modes}
        inputs: dict[str, torch.Tensor] = {}
        for _ in range(args.rounds):
            for mode, transform in modes.items():
                start = time.perf_counter()
                batch = [transform(open_rgb(p, decode_min_side(transform))) for p in paths]
                times[mode].append((time.perf_counter() - start) / len(paths))
                inputs[mode] = torch.stack(batch)
        decoded = open_rgb(paths[0], decode_min_side(modes["reduced"])).size
        augmentations = {
            mode: build_augmentation(resolve_config("dinov2_vits14", {"reduced_decode": mode == "reduced"}))
            for mode in ("whole", "reduced")
        }
        augmentation = augmentations["reduced"]
        crops: dict[str, list[float]] = {"whole": [], "reduced": []}
        for _ in range(args.rounds):
            for mode, augmentation_of_mode in augmentations.items():
                dataset = MultiCropDataset(paths, augmentation_of_mode)
                start = time.perf_counter()
                for i in range(len(paths)):
                    dataset[(i, i)]
                crops[mode].append((time.perf_counter() - start) / len(paths))
    torch.manual_seed(0)
    model = dinokit.create_model("dinov2_vits14").eval()
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(model(inputs["whole"]), model(inputs["reduced"]))
    whole, reduced = (statistics.median(times[m]) * 1000 for m in modes)
    print(f"{args.size[0]} x {args.size[1]} JPEGs (quality 90), decode + eval transform to 224 px, one thread:")
    print(f"  whole decode    {whole:7.1f} ms / image")
    print(f"  reduced decode  {reduced:7.1f} ms / image ({decoded[0]} x {decoded[1]} decoded)  {whole / reduced:.1f}x")
    difference = float((inputs["whole"] - inputs["reduced"]).abs().max())
    print(f"  model input max abs diff {difference:.3f} (normalised units)")
    print(f"  ViT-S/14 (random init) CLS cosine, reduced vs whole: min {float(cosine.min()):.6f}")
    whole, reduced = (statistics.median(crops[m]) * 1000 for m in crops)
    print(f"pretraining item (decode + 2 x 224 + 8 x 98 px crops), min_side {augmentation.decode_min_side}:")
    print(f"  whole decode    {whole:7.1f} ms / image")
    print(f"  reduced decode  {reduced:7.1f} ms / image  {whole / reduced:.1f}x")


if __name__ == "__main__":
    main()
