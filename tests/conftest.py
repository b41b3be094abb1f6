import functools
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit import runtime
from dinokit.models.vision_transformer import VisionTransformer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: on a busy machine one thread is faster than a thrashing pool (`usefixtures`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_bf16_cache(monkeypatch):
    """An empty per-GPU cache of bf16 answers for this test, for tests that fake the GPUs or their answers
    (the process's real cache is back afterwards)."""
    monkeypatch.setattr(runtime, "_cuda_native_bf16", functools.cache(runtime._cuda_native_bf16.__wrapped__))


# what a CUDA GPU's caching allocator raises when a forward pass does not fit
GPU_OUT_OF_MEMORY = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.79 GiB of which 1.25 GiB "
    "is free. Including non-PyTorch memory, this process has 6.52 GiB memory in use."
)


@pytest.fixture
def memory_fits(monkeypatch):
    """`memory_fits(n, error=...)`: every VisionTransformer's forward of more than n images raises `error`
    (a GPU's torch.OutOfMemoryError by default), as a device without the memory for them would; returns
    the list of the batch sizes tried, filled as they come."""

    def limit(fits: int, error: Exception | None = None) -> list[int]:
        tried: list[int] = []
        for name in ("forward_features", "get_intermediate_layers"):
            original = getattr(VisionTransformer, name)

            def forward(self, x, *args, original=original, **kwargs):
                tried.append(len(x))
                if len(x) > fits:
                    raise error or torch.OutOfMemoryError(GPU_OUT_OF_MEMORY)
                return original(self, x, *args, **kwargs)

            monkeypatch.setattr(VisionTransformer, name, forward)
        return tried

    return limit


def perturb_scales_and_norms(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Give LayerScale gammas and LayerNorm weights/biases non-trivial values (in place).

    At the init values (LayerScale 1e-5, norm weight 1 / bias 0) a wrong key mapping can go unseen:
    every input then gives nearly the same output.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in ("gamma", "lambda1", "norm", "layernorm", "ls1", "ls2")):
                p.copy_(torch.randn_like(p) * scale + (1.0 if name.endswith(("weight", "gamma", "lambda1")) else 0.0))
            elif name.endswith(("cls_token", "register_tokens", "reg_token", "mask_token")):
                p.copy_(torch.randn_like(p))
    return module


def random_images(folder: Path, count: int, size: int, rng: np.random.Generator, prefix: str = "") -> None:
    """`count` noise PNGs of size x size px in `folder` (created), named <prefix><i>.png."""
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{prefix}{i}.png")


def dead_writer_tag() -> str:
    """`<host>-<pid>` of a process on this host that has ended, as io named a writer's temporary folder
    (`.<name>.tmp-<host>-<pid>`, `.<name>.old-<host>-<pid>`) before its names got a random part and a
    lock file: what such a writer killed mid-write left, which io judges by its pid (it has no lock)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{socket.gethostname()}-{int(dead.stdout)}"


def leftover_writer_folders(folder: Path, name: str, content: str) -> dict[str, Path]:
    """Temporary folders of writers of `folder / name`, each holding a half-written file `content`: one
    of a dead writer on this host, one of a live one (this test's parent process), one of another host
    (with the dead writer's pid)."""
    dead = dead_writer_tag()
    left = {
        "dead writer here": folder / f".{name}.tmp-{dead}",
        "live writer here": folder / f".{name}.tmp-{socket.gethostname()}-{os.getppid()}",
        "another host's": folder / f".{name}.tmp-elsewhere-{dead.rsplit('-', 1)[1]}",
    }
    for path in left.values():
        path.mkdir()
        (path / content).write_bytes(b"half")
    return left


def run_example(script: Path, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`python script *args` in this process (runpy, as __main__): an example end to end without a fresh
    interpreter's 3-5 s of importing torch, torchvision, scikit-image, ... again. sys.argv and sys.path
    (which the examples extend) are as they were afterwards; the test reads the output with capsys."""
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    monkeypatch.setattr(sys, "path", list(sys.path))
    runpy.run_path(str(script), run_name="__main__")


def aten_op_names(run) -> list[str]:
    """The names of the aten ops (e.g. "index_add.default") that `run()` dispatches, in order: what a
    forward or a backward computes, for tests that pin which kernels a path uses."""
    return [name for name, _ in aten_op_outputs(run, views=True)]


def aten_op_outputs(run, views: bool = False) -> list[tuple[str, list[tuple[tuple[int, ...], torch.dtype]]]]:
    """(name, [(shape, dtype) of each tensor it returns]) of the aten ops `run()` dispatches, in order,
    views left out unless `views`: for tests that pin which arrays a path makes (in-place ops' names end in "_")."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[tuple[str, list[tuple[tuple[int, ...], torch.dtype]]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
            if views or not func.is_view:
                self.ops.append((func.__name__, [(tuple(t.shape), t.dtype) for t in tensors]))
            return out

    with Recorder() as recorder:
        run()
    return recorder.ops
