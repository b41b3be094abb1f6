"""Profile one DINOv2 training step of bench/train_throughput.py (dinokit or lightly) with torch.profiler.

python bench/profile_train_step.py --device cuda --library dinokit --precision bf16
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--library", default="dinokit", choices=["dinokit", "lightly"])
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = {k: v.to(args.device) for k, v in bench.make_inputs().items()}
    build = bench.dinokit_step_fn if args.library == "dinokit" else bench.lightly_step_fn
    step = build(args.device, args.precision, False)
    for _ in range(5):
        step(inputs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step(inputs)
    averages = prof.key_averages()
    device_sort = "cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(averages.table(sort_by=device_sort, row_limit=args.rows, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
