"""`make demo`: what dinokit does today, end to end, on photos that scikit-image ships.

1. builds every named architecture and checks the released parameter counts;
2. round-trips a ViT-S/14 through the dinokit, official and Hugging Face formats, comparing outputs;
3. extracts CLS and patch features of the photos in bf16 and fp32 and compares them.
A report is written to `out/report.md`. Without `model=` the network is randomly initialised (its
features then mean nothing; the demo says so); with a released checkpoint they are real.
"""

import tempfile
import time
from pathlib import Path

import torch

from dinokit.data.images import to_rgb
from dinokit.data.transforms import eval_transform
from dinokit.io import atomic_write
from dinokit.models import create_model, export_model, load_model
from dinokit.models.commands import architecture_table, list_models

RELEASED_PARAMS = {
    "dinov2_vits14": 22_056_576,
    "dinov2_vitb14": 86_580_480,
    "dinov2_vitl14": 304_368_640,
    "dinov2_vitg14": 1_136_480_768,
    "dinov2_vits14_reg": 22_058_112,
    "dinov2_vitb14_reg": 86_583_552,
    "dinov2_vitl14_reg": 304_372_736,
    "dinov2_vitg14_reg": 1_136_486_912,
}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")


def skimage_photos() -> dict:
    """name -> PIL RGB image, from scikit-image's bundled data."""
    from PIL import Image
    from skimage import data

    return {name: to_rgb(Image.fromarray(getattr(data, name)())) for name in PHOTOS}


def demo(out: str = "out/demo", model: str | None = None, image_size: int = 224) -> str:
    """Run the demo: architectures, format round trips, features of sample photos; writes a report."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ["# dinokit demo", ""]

    list_models()
    table = {r["name"]: r["params"] for r in architecture_table()}
    for name, expected in RELEASED_PARAMS.items():
        assert table[name] == expected, f"{name}: {table[name]} parameters, released model has {expected}"
    report += ["## Architectures", "", "Released parameter counts reproduced exactly:", ""]
    report += [f"- {n}: {table[n]:,}" for n in RELEASED_PARAMS] + [""]

    torch.manual_seed(0)
    net = load_model(model) if model else create_model("dinov2_vits14")
    source = model or "dinov2_vits14 at random init (pass model=... for real features)"
    x = torch.randn(2, 3, image_size, image_size)
    report += ["## Format round trips", "", "| format | max abs diff of CLS |", "|---|---|"]
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        reference = net(x)
        for fmt, name in (("dinokit", "m.safetensors"), ("official", "m.pth"), ("hf", "hf")):
            reloaded = load_model(export_model(net, Path(tmp) / name, format=fmt))
            diff = (reloaded(x) - reference).abs().max().item()
            print(f"round trip {fmt:<9} max abs diff {diff:.2e}")
            report.append(f"| {fmt} | {diff:.2e} |")
    report.append("")

    photos = skimage_photos()
    transform = eval_transform(image_size)
    batch = torch.stack([transform(im) for im in photos.values()])
    with torch.inference_mode():
        t = time.perf_counter()
        fp32 = net.forward_features(batch)
        t_fp32 = time.perf_counter() - t
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t = time.perf_counter()
            bf16 = net.forward_features(batch)
            t_bf16 = time.perf_counter() - t
    cls = torch.nn.functional.normalize(fp32["x_norm_clstoken"], dim=-1)
    agreement = torch.nn.functional.cosine_similarity(fp32["x_norm_clstoken"], bf16["x_norm_clstoken"].float())
    features = {"cls": fp32["x_norm_clstoken"], "patch_tokens": fp32["x_norm_patchtokens"]}
    from safetensors.torch import save_file

    atomic_write(
        out_dir / "features.safetensors", lambda tmp: save_file({k: v.contiguous() for k, v in features.items()}, tmp)
    )
    names = list(photos)
    report += [
        "## Features of scikit-image photos",
        "",
        f"Model: {source}; {image_size} px; patch grid {fp32['x_norm_patchtokens'].shape[1]} tokens.",
        f"fp32 {t_fp32:.2f} s, bf16 autocast {t_bf16:.2f} s for {len(names)} images; "
        f"CLS cosine bf16 vs fp32: min {agreement.min().item():.4f}.",
        "",
        "Cosine similarity of CLS features:",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    sim = cls @ cls.T
    report += [
        f"| {n} | " + " | ".join(f"{v:.2f}" for v in row.tolist()) + " |" for n, row in zip(names, sim, strict=True)
    ]
    text = "\n".join(report) + "\n"
    atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text(text))
    print(
        f"\nfeatures of {len(names)} photos: {tuple(features['patch_tokens'].shape)} patch tokens; "
        f"bf16 vs fp32 CLS cosine >= {agreement.min().item():.4f}"
    )
    return str(out_dir / "report.md")
