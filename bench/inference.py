"""Inference throughput: dinokit ViT-S/14 vs transformers Dinov2Model with the same weights, one run.

    python bench/inference.py                     # CPU: batch 32, 224 px, 7 timed rounds
    python bench/inference.py --device cuda       # GPU (bf16 autocast and fp32)

Modes are timed round-robin (one batch of each per round) so that load changes hit them alike; the
table shows the median images/s of each, ratios to the peer, and the CLS cosine similarity of each
bf16 mode to dinokit fp32.
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Dinov2Model

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
import dinokit  # noqa: E402
from tests.conftest import perturb_scales_and_norms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    # interpolate_offset=0.0 is what transformers' Dinov2Model computes, so the outputs can be compared
    # (the official +0.1 offset changes the resampled position embedding at 224 px; speed is the same).
    model = dinokit.create_model("dinov2_vits14", interpolate_offset=0.0)
    ours = perturb_scales_and_norms(model, 0.1).eval().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = dinokit.export_model(ours, Path(tmp) / "hf", format="hf")
        peer_sdpa = Dinov2Model.from_pretrained(folder, attn_implementation="sdpa").eval().to(device)
        peer_eager = Dinov2Model.from_pretrained(folder, attn_implementation="eager").eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    def bf16():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    modes = {
        "transformers fp32 (sdpa)": (lambda: peer_sdpa(pixel_values=x).pooler_output, contextlib.nullcontext),
        "transformers bf16 autocast (sdpa)": (lambda: peer_sdpa(pixel_values=x).pooler_output, bf16),
        "transformers bf16 autocast (eager)": (lambda: peer_eager(pixel_values=x).pooler_output, bf16),
        "dinokit fp32": (lambda: ours(x), contextlib.nullcontext),
        "dinokit bf16 autocast": (lambda: ours(x), bf16),
    }
    if device.type == "cpu":  # the same model without its CPU inference slicing (cpu_inference_tokens)
        modes["dinokit bf16 autocast, unsliced"] = (lambda: unsliced(ours, x), bf16)
    times: dict[str, list[float]] = {name: [] for name in modes}
    outputs = {}
    with torch.inference_mode():
        for name, (run, ctx) in modes.items():  # warm-up, and the outputs for the agreement check
            with ctx():
                outputs[name] = run().float()
        for _ in range(args.rounds):
            for name, (run, ctx) in modes.items():
                with ctx():
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    run()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)

    ips = {name: args.batch / statistics.median(t) for name, t in times.items()}
    peer_fp32 = ips["transformers fp32 (sdpa)"]
    peer_best_bf16 = max(ips["transformers bf16 autocast (sdpa)"], ips["transformers bf16 autocast (eager)"])
    reference = outputs["dinokit fp32"]
    print(
        f"\ndevice {device} ({torch.get_num_threads()} threads), batch {args.batch}, {args.size} px, "
        f"median of {args.rounds} rounds, torch {torch.__version__}"
    )
    print(f"{'mode':<38} {'img/s':>8} {'x peer fp32':>12} {'x peer best bf16':>17} {'CLS cos vs fp32':>16}")
    for name in modes:
        cos = F.cosine_similarity(outputs[name], reference).min().item()
        ratios = f"{ips[name] / peer_fp32:>12.2f} {ips[name] / peer_best_bf16:>17.2f}"
        print(f"{name:<38} {ips[name]:>8.1f} {ratios} {cos:>16.5f}")
    fp32_diff = (outputs["transformers fp32 (sdpa)"] - reference).abs().max().item()
    print(f"\nmax abs diff of CLS, dinokit fp32 vs transformers fp32: {fp32_diff:.2e}")
    print("matrix-product speed of this device (what bounds any bf16 / fp32 ratio):")
    tokens = args.batch * ((args.size // 14) ** 2 + 1)
    for label, (m, k, n) in {"ViT-S qkv shape": (tokens, 384, 1152), "square 2048": (2048, 2048, 2048)}.items():
        rates = {dtype: matmul_gflops(m, k, n, dtype, device) for dtype in (torch.float32, torch.bfloat16)}
        fp32, bf16_rate = rates[torch.float32], rates[torch.bfloat16]
        print(f"  {label:<16} fp32 {fp32:6.0f} GFLOP/s, bf16 {bf16_rate:6.0f} ({bf16_rate / fp32:.2f}x)")


def unsliced(model, x: torch.Tensor) -> torch.Tensor:
    saved, model.cpu_inference_tokens = model.cpu_inference_tokens, 10**9
    try:
        return model(x)
    finally:
        model.cpu_inference_tokens = saved


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times[1:]) / 1e9


if __name__ == "__main__":
    main()
