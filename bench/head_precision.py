"""How far a DINO head's reduced-precision logits move the teacher's probabilities.

The DINOv2 ViT-S/14 recipe's head (384 -> 2048 -> 2048 -> 256 -> 65536 prototypes, weight-normalised
last layer, DINOv2's init) on random inputs, run in float32 and under bf16 / fp16 autocast; the
teacher's softmax at temperature 0.04 (its value after warm-up in the DINO v1 recipe, its start in
DINOv2's) of each against float32's. Prints, per precision: the largest logit error, the largest change
of any probability and of a row's top probability relative to itself, and the mean KL(float32 ||
reduced) in nats.

    python bench/head_precision.py                 # CPU
    python bench/head_precision.py --device cuda
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dinokit.losses import DINOHead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.04)
    args = parser.parse_args()
    torch.manual_seed(0)
    head = DINOHead(384, 65536).to(args.device).eval()
    x = torch.randn(args.rows, 384, device=args.device)
    with torch.no_grad():
        reference = head(x).float()
        p = torch.softmax(reference / args.temperature, dim=1)
        top, index = p.max(dim=1)
        print(f"{args.rows} rows x 65536 prototypes, temperature {args.temperature}, device {args.device}")
        print("| precision | max logit error | max probability change | max top-probability change | mean KL (nats) |")
        print("|---|---|---|---|---|")
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(torch.device(args.device).type, dtype=dtype):
                logits = head(x).float()
            q = torch.softmax(logits / args.temperature, dim=1)
            anywhere = (q / p - 1).abs().max().item()  # relative to itself
            change = ((q.gather(1, index[:, None]).squeeze(1) - top).abs() / top).max().item()
            kl = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(dim=1).mean().item()
            error = (logits - reference).abs().max().item()
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {error:.1e} | {100 * anywhere:.1f}% | {100 * change:.1f}% | {kl:.1e} |")


if __name__ == "__main__":
    main()
