"""dinokit from Python: images in, arrays out (the walk-through of docs/python.md, runnable).

    python examples/python_api.py --model dinov2_vits14_reg     # released weights (downloaded once)
    python examples/python_api.py --model path/to/weights       # any file or folder load_model reads
    python examples/python_api.py                               # random init: runs, means nothing

Every step prints the shapes it gets. Outputs (photos, embedding, index) go to out/python_api/.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import dinokit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="weights (file, folder or released name); default: random init")
    parser.add_argument("--out", default="out/python_api")
    parser.add_argument("--image-size", type=int, default=224, help="a multiple of the model's patch size")
    args = parser.parse_args()
    out = Path(args.out)
    size = args.image_size

    # 1. A model: released name, any weights file / folder, or a random-init named architecture.
    if args.model is None:
        print("no --model given: a RANDOMLY INITIALISED dinov2_vits14_reg; the numbers below mean nothing")
        model = dinokit.create_model("dinov2_vits14_reg").eval()
        weights = dinokit.export_model(model, out / "random_init.safetensors")  # embed() takes a path
    else:
        model = dinokit.load_model(args.model)  # eval mode, on the CPU (device="cuda" moves it)
        weights = args.model

    # 2. PIL images -> one batch: the official eval transform (resize to size * 256/224, centre crop).
    photos = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("chelsea", "astronaut")}
    transform = dinokit.eval_transform(size, patch_size=model.patch_size)
    batch = torch.stack([transform(image) for image in photos.values()])  # (B, 3, size, size)
    with torch.inference_mode():
        cls = model(batch)  # (B, D): the normed CLS token
        tokens = model.forward_features(batch)
        layers = model.get_intermediate_layers(batch, n=4, reshape=True, return_class_token=True)
    print("cls", tuple(cls.shape))
    print({key: None if value is None else tuple(value.shape) for key, value in tokens.items()})
    print("last 4 blocks:", [(tuple(patches.shape), tuple(c.shape)) for patches, c in layers])

    # 3. A folder of images -> arrays (decoded in DataLoader workers; unreadable files skipped).
    folder = out / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in photos.items():
        image.save(folder / f"{name}.jpg")
    paths = dinokit.list_images(folder)
    feats, kept, bad = dinokit.extract_features(
        model, paths, transform, which=["cls", "patch_tokens"], num_workers=0, progress=False
    )
    cls_array = feats["cls"].numpy()  # (N, D) float32, row i is paths[kept[i]]
    print("folder:", {k: tuple(v.shape) for k, v in feats.items()}, "rows:", [paths[i].name for i in kept])
    print("unreadable:", [str(paths[i]) for i in bad])
    print("cosine chelsea . astronaut:", float(cls_array[0] @ cls_array[1] / np.linalg.norm(cls_array, axis=1).prod()))

    # 4. Maps on the whole image (aspect-preserving resize; no crop), as numpy arrays.
    whole = dinokit.eval_transform(size, "aspect", patch_size=model.patch_size)
    cat = whole(photos["chelsea"])  # (3, H, W), H = size, W the nearest multiple of the patch size
    attention = dinokit.attention_maps(model, cat)
    print("attention:", {k: v.shape for k, v in attention.items()})
    grids = dinokit.patch_features(model, [cat, whole(photos["astronaut"])])  # [(h, w, D), ...]
    pca = dinokit.pca_rgb(grids, foreground_threshold=0.5)
    print("pca rgb:", [rgb.shape for rgb in pca["rgb"]], "variance:", pca["explained_variance_ratio"].round(3))
    eye = (grids[0].shape[0] // 3, grids[0].shape[1] // 3)  # (row, col) of a patch
    print("similarity:", dinokit.patch_similarity(grids[0], eye, target=grids[1]).shape)
    mask = np.zeros(photos["chelsea"].size[::-1], dtype=bool)  # (H, W) of the photo: a box as reference
    mask[50:250, 100:350] = True
    target = photos["astronaut"].size[::-1]
    segmented = dinokit.segment_features([(grids[0], mask)], grids[1], size=target)
    print("segment:", segmented["mask"].shape, f"foreground {segmented['mask'].mean():.2f}")

    # 5. Embed to disk, index, search (what `dinokit embed / index build / index search` do).
    dinokit.embed(
        model=str(weights), data=str(folder), out=str(out / "emb"), image_size=size, num_workers=0, progress=False
    )
    dinokit.build_index(features=str(out / "emb"), out=str(out / "photos.index"))
    hits = dinokit.search_index(str(out / "photos.index"), str(folder / "chelsea.jpg"), k=2)
    print("search:", [(Path(h["path"]).name, round(h["score"], 3)) for h in hits[0]["hits"]])


if __name__ == "__main__":
    main()
