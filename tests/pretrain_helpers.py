"""Shared set-up of the pretraining tests: a tiny model on tiny rendered images."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dinokit
from dinokit.data.synthetic import write_classification_set

# A 2-block, 32-dim ViT on 16 px crops: one iteration takes milliseconds.
TINY = dict(
    preset="dinov2_vits14",
    arch="vit_nano_p2",
    global_crops_size=16,
    local_crops_size=8,
    local_crops_number=2,
    head_prototypes=64,
    head_hidden_dim=32,
    head_bottleneck_dim=16,
    ibot_prototypes=64,
    batch_size=8,
    num_workers=0,
    device="cpu",  # resume is exact on the CPU; tests/test_cuda.py runs the GPU
    blur_kernel_size=0,
    drop_path_rate=0.1,
    layerscale=0,
    lr=0.01,
    epochs=0,
    log_every=2,
    checkpoint_every=0,
    checkpoint_every_minutes=0,
    progress=False,
    tensorboard=False,
)


def tiny_images(root: Path, per_class: int = 4) -> Path:
    """32 (per_class x 8 shapes) rendered 16 px images under root/train/<shape>/."""
    if not (root / "train").exists():
        write_classification_set(root, per_class=per_class, size=16, seed=0)
    return root / "train"


def run(data, out, **keys):
    """`dinokit.pretrain` of TINY with `keys` on `data` into `out`."""
    return dinokit.pretrain(data=str(data), out=str(out), **{**TINY, **keys})


def finished_run(root: Path, name: str) -> tuple[Path, Path]:
    """(data, run folder) of a finished 4-iteration TINY run (DINOv2: DINO + iBOT + KoLeo) of
    vit_nano_p2 under `root`: what continue_from= and distill_from= start from."""
    data = tiny_images(root / "data")
    run(data, root / name, max_iterations=4)
    return data, root / name


def run_torchrun(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 args` on the CPU. On a timeout the test fails, and
    torchrun is stopped with SIGTERM, on which it stops its processes (each in a session of its own)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.communicate(timeout=60)
        pytest.fail(f"torchrun {' '.join(args)} still running after {timeout} s: the processes hang")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
