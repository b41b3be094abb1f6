"""The pictures of `dinokit.maps`: attention, PCA, similarity, matches on scikit-image's photos; segmentation.

    python examples/feature_maps.py --model dinov2_vits14_reg     # released weights (downloaded once)
    python examples/feature_maps.py --model path/to/checkpoint    # any file load_model reads
    python examples/feature_maps.py                               # random init: maps mean nothing

Without --model the network is randomly initialised (`random:dinov2_vits14_reg`, seeded): the
attention, PCA, similarity and matches pictures then say RANDOM INIT in their titles (the segmentation
masks and overlays carry no title), as they only show that the tools run, not what DINO features look
like. Outputs go to out/examples/.
The segmentation example uses rendered shape scenes (dinokit.data.synthetic), whose masks are exact.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dinokit.data.synthetic import render_scene  # noqa: E402
from dinokit.maps.commands import (  # noqa: E402
    segment,
    visualize_attention,
    visualize_matches,
    visualize_pca,
    visualize_similarity,
)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="weights (file, folder or released name); default: random init")
    parser.add_argument("--out", default="out/examples")
    parser.add_argument("--image-size", type=int, default=448)
    args = parser.parse_args()
    out = Path(args.out)
    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).convert("RGB").save(photos / f"{name}.png")

    model = args.model
    if model is None:
        model = "random:dinov2_vits14_reg"
        print("no --model given: using a RANDOMLY INITIALISED dinov2_vits14_reg; the maps will be meaningless")
    size = args.image_size
    common = dict(model=model, image_size=size)

    print(visualize_attention(str(photos / "chelsea.png"), str(out / "attention_chelsea.png"), **common))
    print(visualize_pca(str(photos), str(out / "pca_joint.png"), foreground_threshold=0.5, **common))
    # the cat's left eye, against the whole cat photo and against the astronaut
    print(visualize_similarity(str(photos / "chelsea.png"), 145, 105, str(out / "similarity_eye.png"), **common))
    print(
        visualize_similarity(
            str(photos / "chelsea.png"),
            145,
            105,
            str(out / "similarity_eye_astronaut.png"),
            target=str(photos / "astronaut.png"),
            **common,
        )
    )

    # the cat against its mirror image: each matched patch should land on its mirrored place
    flipped = out / "chelsea_flipped.png"  # not in photos/, which the joint PCA reads whole
    Image.open(photos / "chelsea.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    print(visualize_matches(str(photos / "chelsea.png"), str(flipped), str(out / "matches.png"), **common))

    scenes = out / "scenes"
    (scenes / "targets").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    reference = render_scene(rng, size=224, num_shapes=1)
    Image.fromarray(reference.image).save(scenes / "reference.png")
    Image.fromarray((reference.mask > 0).astype(np.uint8) * 255).save(scenes / "reference_mask.png")
    for i in range(4):
        Image.fromarray(render_scene(rng, size=224, num_shapes=2).image).save(scenes / "targets" / f"scene_{i}.png")
    print(
        segment(
            str(scenes / "reference.png"),
            str(scenes / "reference_mask.png"),
            str(scenes / "targets"),
            out=str(out / "segment"),
            model=model,
            image_size=224,
        )
    )
    print(f"pictures in {out}/")


if __name__ == "__main__":
    main()
