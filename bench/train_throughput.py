"""Training throughput of one DINOv2 step: dinokit against lightly's DINOv2 building blocks.

Both sides train a ViT-S/14 student + EMA teacher with DINO (65536 prototypes, shared iBOT head),
iBOT and KoLeo losses, AdamW with layer-wise decay, gradient clipping and the teacher update, on the
same pre-generated crops (batch 8: 2 x 224 + 8 x 98 px) and the same iBOT masks, with drop path 0.1.
lightly's side follows its `benchmarks/imagenet/vitb16/dinov2.py` recipe (timm ViT wrapped in
MaskedVisionTransformerTIMM, DINOProjectionHead, DINOLoss, IBOTPatchLoss, KoLeoLoss, update_momentum).
Each (library, precision) runs in its own subprocess, so peak memory (CPU: the process's peak RSS,
model, optimiser state and imports included; CUDA: max allocated during the steps) is its own; the
pairs alternate to spread machine drift.

    python bench/train_throughput.py                       # CPU, fp32 and bf16
    python bench/train_throughput.py --device cuda --compile
    python bench/train_throughput.py --device cuda --batch 64 --rounds 3   # a batch that fills a GPU
    python bench/train_throughput.py --peer dinokit-default-malloc   # dinokit with / without reuse_freed_memory
    python bench/train_throughput.py --saved-activations             # MB autograd saves for dinokit's backward,
                                                                     # without and with activation checkpointing
"""

import argparse
import contextlib
import json
import math
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

BATCH, N_LOCAL, GLOBAL, LOCAL, PROTOTYPES, DROP_PATH = 8, 8, 224, 98, 65536, 0.1


def make_inputs(seed: int = 0) -> dict:
    """Crops (already normalised) and iBOT masks of one batch, identical for both libraries."""
    from dinokit.data.collate import stratified_masks
    from dinokit.data.masking import MaskingGenerator

    g = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(2 * BATCH, 3, GLOBAL, GLOBAL, generator=g)
    local_crops = torch.randn(N_LOCAL * BATCH, 3, LOCAL, LOCAL, generator=g)
    grid = GLOBAL // 14
    masks = stratified_masks(
        2 * BATCH, MaskingGenerator(grid, max_num_patches=grid * grid // 2), np.random.default_rng(seed)
    )
    return {"global": global_crops, "local": local_crops, "masks": masks}


def autocast(device: str, precision: str):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


# --------------------------------------------------------------------------------------------- dinokit
def dinokit_step_fn(device: str, precision: str, compile_model: bool, pack_saved=None, checkpointing: bool = False):
    """dinokit's step; `pack_saved` (a saved_tensors_hooks pack function) sees every tensor autograd
    saves for its backward, and with `checkpointing` (activation_checkpointing=true) each student
    block's input, which its checkpoint holds instead (`saved_activations_mb`)."""
    from dinokit.train.build import build_model
    from dinokit.train.config import resolve_config
    from dinokit.train.ema import update_teacher
    from dinokit.train.optim import apply_schedule, build_optimizer, clip_gradients, param_groups

    keys = {"drop_path_rate": DROP_PATH, "local_crops_size": LOCAL, "activation_checkpointing": checkpointing}
    cfg = resolve_config("dinov2_vits14", keys)
    model = build_model(cfg).to(device).train()
    if checkpointing and pack_saved is not None:  # the input each checkpoint holds for its recomputation

        def held_input(block: torch.nn.Module, args: tuple) -> None:
            pack_saved(args[0])

        for block in model.student.backbone.blocks:
            block.register_forward_pre_hook(held_input)
    if compile_model:
        for net in (model.student, model.teacher):
            for block in net.backbone.blocks:
                block.compile(dynamic=False)
    groups = param_groups(model.student.backbone, model.student.heads(), cfg.layerwise_decay, cfg.patch_embed_lr_mult)
    optimizer = build_optimizer(groups)
    values = dict(
        lr=1e-4, last_layer_lr=1e-4, backbone_lr_factor=1.0, weight_decay=0.04, momentum=0.992, teacher_temp=0.05
    )
    student_params, teacher_params = list(model.student.parameters()), list(model.teacher.parameters())
    modules = [model.student.backbone, *model.student.heads().values()]

    def step(x: dict) -> float:
        apply_schedule(optimizer, values)
        masks = x["masks"]
        weights = (1.0 / masks.sum(1, keepdim=True).clamp(min=1)).expand_as(masks)[masks]
        with autocast(device, precision):  # as the trainer's step: no logits kept beyond autograd's own
            teacher = model.teacher_outputs(x["global"], masks)
            targets = model.teacher_probabilities(teacher, values["teacher_temp"])
            center_statistics = model.center_statistics(teacher)
            del teacher
            with saved_tensor_hooks(pack_saved):
                parts = model.losses(model.student(x["global"], x["local"], masks), targets, 2, weights)
            del targets
        parts["loss"].backward()
        clip_gradients(modules, 3.0)
        optimizer.step()
        model.update_centers(center_statistics)
        update_teacher(teacher_params, student_params, values["momentum"])
        optimizer.zero_grad(set_to_none=True)
        return parts["loss"].item()

    return step


def saved_tensor_hooks(pack):
    """torch.autograd.graph.saved_tensors_hooks(pack, identity), or nothing where pack is None."""
    if pack is None:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def saved_activations_mb(precision: str, checkpointing: bool = False) -> float:
    """MB of the distinct storages autograd saves for the backward of one dinokit step on the CPU:
    the student side (backbone, heads, losses), what the step's memory peak is made of; with
    `checkpointing`, what it saves outside the student's blocks and the blocks' inputs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(0)
    dinokit_step_fn("cpu", precision, False, pack, checkpointing)(make_inputs())
    return sum(storages.values()) / 2**20


# --------------------------------------------------------------------------------------------- lightly
def lightly_step_fn(device: str, precision: str, compile_model: bool):
    import copy

    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
    from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import update_drop_path_rate, update_momentum
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        img_size=GLOBAL, patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5, dynamic_img_size=True
    )
    teacher_backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
    student_backbone = copy.deepcopy(teacher_backbone)
    update_drop_path_rate(student_backbone.vit, drop_path_rate=DROP_PATH, mode="uniform")
    student_head = DINOProjectionHead(input_dim=384, output_dim=PROTOTYPES, norm_last_layer=False, freeze_last_layer=1)
    teacher_head = DINOProjectionHead(input_dim=384, output_dim=PROTOTYPES, norm_last_layer=False)
    teacher_head.load_state_dict(student_head.state_dict())  # lightly's weight_norm head cannot be deep-copied
    for m in (teacher_backbone, teacher_head):
        m.requires_grad_(False)
        m.eval()
    student_backbone.to(device).train()
    student_head.to(device).train()
    teacher_backbone.to(device)
    teacher_head.to(device)
    if compile_model:
        for net in (student_backbone, teacher_backbone):
            for block in net.vit.blocks:
                block.compile(dynamic=False)
    dino_loss, ibot_loss, koleo_loss = (
        DINOLoss(PROTOTYPES).to(device),
        IBOTPatchLoss(PROTOTYPES).to(device),
        KoLeoLoss(),
    )

    # AdamW groups as the recipe: one group per parameter, layer-wise decay 0.9, patch_embed x 0.2
    lr, num_layers = 1e-4, 12
    groups = []
    for name, p in [
        *(("backbone." + n, p) for n, p in student_backbone.named_parameters()),
        *(("head." + n, p) for n, p in student_head.named_parameters()),
    ]:
        if not p.requires_grad or "vit.head" in name:
            continue
        group = {"params": [p], "lr": lr, "weight_decay": 0.04}
        if any(s in name for s in ("pos_embed", "mask_token", "cls_token", "register_tokens")):
            group["lr"] = lr * 0.9 ** (num_layers + 1)
        elif "patch_embed" in name:
            group["lr"] = lr * 0.9 ** (num_layers + 1) * 0.2
        elif "blocks" in name:
            layer = int(re.search(r"blocks\.(\d+)\.", name).group(1))
            group["lr"] = lr * 0.9 ** (num_layers - layer)
        if name.endswith(".bias") or ".norm" in name or "gamma" in name:
            group["weight_decay"] = 0.0
        groups.append(group)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    student_params = [*student_backbone.parameters(), *student_head.parameters()]

    def step(x: dict) -> float:
        views_global, views_local, masks = x["global"], x["local"], x["masks"]
        b = len(views_global)
        grid = GLOBAL // 14
        block_mask = masks.view(b, grid, grid)
        mask = views_global.new_zeros((b, grid * grid + 1), dtype=torch.bool)
        mask[:, 1:] = masks
        with autocast(device, precision):
            with torch.no_grad():
                teacher_features = teacher_backbone.encode(views_global)
                teacher_cls_out = teacher_head(teacher_features[:, 0])
                teacher_masked_out = teacher_head(teacher_features[mask])
            student_global = student_backbone.encode(views_global, mask=mask)
            student_global_cls_out = student_head(student_global[:, 0])
            student_global_masked_out = student_head(student_global[mask])
            student_local = student_backbone.encode(views_local)
            student_cls_out = torch.cat([student_global_cls_out, student_head(student_local[:, 0])])
            loss_dino = dino_loss(
                teacher_out=teacher_cls_out.chunk(2), student_out=student_cls_out.chunk(2 + N_LOCAL), teacher_temp=0.05
            )
            loss_ibot = ibot_loss(
                teacher_out=teacher_masked_out,
                student_out=student_global_masked_out,
                mask=block_mask,
                teacher_temp=0.05,
            )
            loss_koleo = 0.1 * sum(koleo_loss(t) for t in student_global[:, 0].chunk(2))
            loss = loss_dino + loss_ibot + loss_koleo
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student_params, 3.0)
        student_head.cancel_last_layer_gradients(current_epoch=1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_momentum(student_backbone, teacher_backbone, m=0.992)
        update_momentum(student_head, teacher_head, m=0.992)
        return loss.item()

    return step


# --------------------------------------------------------------------------------------------- runner
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(library: str, device: str, precision: str, steps: int, warmup: int, compile_model: bool) -> dict:
    """Time `steps` steps of one library after `warmup`. dinokit's side runs inside
    `reuse_freed_memory()`, as `dinokit pretrain` does on a CPU (a no-op elsewhere);
    "dinokit-default-malloc" is the same step without it."""
    if library == "dinokit" and device == "cpu":
        from dinokit.runtime import reuse_freed_memory

        with reuse_freed_memory():
            return timed_steps(library, device, precision, steps, warmup, compile_model)
    library = "dinokit" if library == "dinokit-default-malloc" else library
    return timed_steps(library, device, precision, steps, warmup, compile_model)


def timed_steps(library: str, device: str, precision: str, steps: int, warmup: int, compile_model: bool) -> dict:
    torch.manual_seed(0)
    inputs = {k: v.to(device) for k, v in make_inputs().items()}
    build = dinokit_step_fn if library == "dinokit" else lightly_step_fn
    step = build(device, precision, compile_model)
    for _ in range(warmup):
        step(inputs)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = peak_rss_mb()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step(inputs))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    memory = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    return {"times": times, "memory_mb": memory, "rss_before_steps_mb": base, "losses": losses}


def main() -> None:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=BATCH, help="images per step (the issue's comparison: 8)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating (dinokit, lightly) rounds per precision")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks (both libraries)")
    parser.add_argument(
        "--peer",
        default="lightly",
        choices=["lightly", "dinokit-default-malloc"],
        help="what dinokit is timed against: lightly, or its own step without reuse_freed_memory (an A/B)",
    )
    parser.add_argument(
        "--saved-activations",
        action="store_true",
        help="only print the MB autograd saves for the backward of dinokit's step (CPU), per precision",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    BATCH = args.batch
    if args.saved_activations:
        for precision in args.precisions.split(","):
            plain, checkpointed = saved_activations_mb(precision), saved_activations_mb(precision, True)
            print(
                f"{precision}: dinokit step saves {plain:.0f} MB for its backward, "
                f"{checkpointed:.0f} MB with activation_checkpointing=true"
            )
        return
    if args.worker:
        library, precision = args.worker.split(":")
        print(json.dumps(worker(library, args.device, precision, args.steps, args.warmup, args.compile)))
        return

    print(
        f"one DINOv2 step, ViT-S/14 student + teacher, batch {BATCH}: 2x{GLOBAL} + {N_LOCAL}x{LOCAL} crops, "
        f"{PROTOTYPES} prototypes, drop path {DROP_PATH}; device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads{', compiled' if args.compile else ''}"
    )
    rows = []
    for precision in args.precisions.split(","):
        results = {"dinokit": [], args.peer: []}
        for _ in range(args.rounds):
            for library in results:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    f"{library}:{precision}",
                    "--device",
                    args.device,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--batch",
                    str(args.batch),
                ] + (["--compile"] if args.compile else [])
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode:
                    sys.exit(f"{library} {precision} failed:\n{run.stderr[-3000:]}")
                out = run.stdout
                results[library].append(json.loads(out.strip().splitlines()[-1]))
        summary = {}
        for library, runs in results.items():
            times = [t for r in runs for t in r["times"]]
            summary[library] = {
                "step_s": statistics.median(times),
                "img_s": BATCH / statistics.median(times),
                "memory_mb": max(r["memory_mb"] for r in runs),
                "loss": runs[-1]["losses"][-1],
            }
        ours, theirs = summary["dinokit"], summary[args.peer]
        rows.append((precision, ours, theirs))
        for library, s in summary.items():
            print(
                f"{precision:5s} {library:8s} step {s['step_s']:7.3f} s  {s['img_s']:6.2f} img/s  "
                f"peak memory {s['memory_mb']:8.0f} MB  loss {s['loss']:.3f}"
            )
        print(
            f"{precision:5s} speed ratio dinokit/{args.peer} {theirs['step_s'] / ours['step_s']:.2f}x, "
            f"memory ratio {ours['memory_mb'] / theirs['memory_mb']:.2f}"
        )
    print(f"\n| precision | dinokit img/s | {args.peer} img/s | speed-up | dinokit peak MB | {args.peer} peak MB |")
    print("|---|---|---|---|---|---|")
    for precision, ours, theirs in rows:
        print(
            f"| {precision} | {ours['img_s']:.2f} | {theirs['img_s']:.2f} | {theirs['step_s'] / ours['step_s']:.2f}x | "
            f"{ours['memory_mb']:.0f} | {theirs['memory_mb']:.0f} |"
        )
    assert all(math.isfinite(r[1]["loss"]) and math.isfinite(r[2]["loss"]) for r in rows)


if __name__ == "__main__":
    main()
