"""Where and how to run, shared by every stage: device choice, autocast, what an out-of-memory error
says, (on CPU) malloc's reuse of freed memory for loops that make large tensors afresh, and stopping
long loops cleanly on a signal."""

import contextlib
import ctypes
import functools
import inspect
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import NamedTuple, NoReturn

import torch

from dinokit.errors import DinokitError

PRECISIONS = ("bf16", "fp32")


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N (the GPU numbered N) or mps"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; or cpu, cuda, cuda:N, mps (any case). An unknown
    name or a device this machine lacks is a DinokitError naming the choices and what is available."""
    text = str(device).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", text)
    if match is None:
        hint = " (a GPU is device=cuda)" if "gpu" in text else ""
        raise DinokitError(
            f"device={device} is not a device name{hint}; use {DEVICE_CHOICES} (available here: {available_devices()})"
        )
    kind, index = match[1], None if match[2] is None else int(match[2])
    if kind == "cuda" and not torch.cuda.is_available():
        raise DinokitError(
            f"device={device} requested but CUDA is not available here; use device=cpu or auto "
            f"(available here: {available_devices()})"
        )
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise DinokitError(
            f"device={device} requested but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
            f"use one of {available_devices()}"
        )
    if kind == "mps" and not mps_available():
        raise DinokitError(
            f"device={device} requested but MPS (Apple GPUs) is not available here; use device=cpu or auto "
            f"(available here: {available_devices()})"
        )
    return torch.device("cpu") if kind == "cpu" else torch.device(kind, index)


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def available_devices() -> str:
    """The device names this machine accepts, e.g. 'cpu, cuda, cuda:0, cuda:1'."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if mps_available():
        names.append("mps")
    return ", ".join(names)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs on `device`: always on the CPU; on a CUDA GPU (the one `device` names,
    or the current one) that supports bf16 natively (emulated bf16 on older GPUs is slower than fp32, so
    it does not count). Each GPU is asked once per process (`_cuda_native_bf16`)."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _cuda_native_bf16(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_native_bf16(index: int) -> bool:
    """Whether CUDA GPU `index` supports bf16 natively; cached, as autocast asks on every step."""
    with torch.cuda.device(index):
        if _NATIVE_BF16_ARGUMENT:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.cuda.is_bf16_supported()


# whether this torch can ask for native bf16 only (checked once, not on every autocast call)
_NATIVE_BF16_ARGUMENT = "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters


_warned_fp32: set[str] = set()  # device types already warned about (one warning per process)


def check_precision(precision: str) -> None:
    """Refuse a precision that is not one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise DinokitError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def effective_precision(device: torch.device, precision: str = "bf16") -> str:
    """The precision that runs on `device` when `precision` is asked for: bf16 where bf16 autocast is
    supported, else fp32 (an older GPU, MPS), with one warning per device type."""
    check_precision(precision)
    if precision == "bf16" and not bf16_supported(device):
        if device.type not in _warned_fp32:
            _warned_fp32.add(device.type)
            warnings.warn(
                f"bf16 autocast is not supported on this device ({device}); running in fp32. "
                "Pass precision=fp32 to silence this warning.",
                stacklevel=3,
            )
        return "fp32"
    return precision


def autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CPU and CUDA where supported (the fast path), or nothing for fp32 (asked for,
    or where bf16 falls back to it: `effective_precision`)."""
    if effective_precision(device, precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class OutOfMemory(NamedTuple):
    """Where memory ran out and what torch said of sizes: ("cuda:0", "tried to allocate 2.00 GiB, 1.25
    GiB free"); device "cpu" is the machine's memory, sizes "" where torch named none."""

    device: str
    sizes: str


# What torch raises when memory runs out. The caching allocators of CUDA and XPU: torch.OutOfMemoryError,
# "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.25 GiB
# is free. ..." (or "... per_process_memory_fraction limit. Requested size: ..."); MPS's: a RuntimeError,
# "MPS backend out of memory (MPS allocated: ..., max allowed: ...). Tried to allocate 9.19 MiB on private
# pool. ..."; a CUDA call outside the allocator (a library's workspace): "CUDA error: out of memory"; the
# CPU allocator: a RuntimeError, "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1024
# bytes. Error code 12 (...)" (Windows: "not enough memory: you tried to allocate 1024 bytes.").
DEVICE_OUT_OF_MEMORY = re.compile(r"(CUDA|XPU|MPS)(?: backend)?(?: error:)? out of memory")
CPU_OUT_OF_MEMORY = re.compile(
    r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory): you tried to allocate (\d+) bytes"
)
GPU_INDEX = re.compile(r"\bGPU (\d+)\b")
TRIED = re.compile(r"(?:Tried to allocate|Requested size:) ([\d.]+ \w+)")
FREE = re.compile(r"of which ([\d.]+ \w+) is free")


def out_of_memory(error: BaseException) -> OutOfMemory | None:
    """Where memory ran out if `error` is torch saying so (a device's or the CPU's allocator), else None."""
    text = str(error)
    cpu = CPU_OUT_OF_MEMORY.search(text)
    if cpu is not None:
        size = int(cpu[1])
        amount = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.2f} MiB"
        return OutOfMemory("cpu", f"tried to allocate {amount}")
    kind = DEVICE_OUT_OF_MEMORY.match(text)
    if kind is None and not isinstance(error, torch.OutOfMemoryError):
        return None
    device = kind[1].lower() if kind is not None else "the device"
    index = GPU_INDEX.search(text)
    if index is not None and device in ("cuda", "xpu"):
        device = f"{device}:{index[1]}"
    tried, free = TRIED.search(text), FREE.search(text)
    sizes = [f"tried to allocate {tried[1]}"] if tried else []
    if free:
        sizes.append(f"{free[1]} free")
    return OutOfMemory(device, ", ".join(sizes))


def device_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a GPU's (or another accelerator's) memory running out, not the CPU's: work can
    go on in smaller pieces there. The CPU's is left an error: on Linux the kernel's OOM killer usually
    ends the process first, and a failed allocation there means the machine is short of memory."""
    found = out_of_memory(error)
    return found is not None and found.device != "cpu"


def free_cached_memory(device: torch.device) -> None:
    """Give the cached blocks of `device`'s caching allocator (CUDA, MPS, XPU) back, after an out-of-memory
    error: the next try starts with that memory free. Nothing to do on the CPU."""
    if device.type in ("cuda", "mps", "xpu"):
        getattr(torch, device.type).empty_cache()


# glibc mallopt parameters (malloc.h) and their defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
_reuse_depth = 0  # open reuse_freed_memory blocks: only the outermost sets and restores malloc's settings


@contextlib.contextmanager
def exact_float32_products() -> Iterator[None]:
    """float32 matrix products in full float32 inside the block, whatever the process chose (TF32 on a
    GPU rounds inputs to 10 bits, too coarse for thresholds on cosines); the setting is restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def keeps_global_rng(function):
    """Decorates a function that seeds and draws from PyTorch's global generators for its own
    reproducibility (initial weights, drop path): the states of the CPU generator and of each CUDA device
    in use at the call come back when it returns or raises, so a call leaves the caller's random stream
    as it was, not reseeded. CUDA generators not yet initialised at the call (a fresh process's first
    CUDA work is the call's) keep the call's seeding: call torch.cuda.manual_seed_all afterwards if a
    later CUDA draw must not depend on it."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            return function(*args, **kwargs)

    return wrapper


def _glibc():
    """The C library, where it is glibc (it has mallopt and malloc_trim); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Inside the block, glibc's malloc serves large allocations from its heap and keeps what is freed
    there for reuse; yields whether that applies (`enabled`, on Linux with glibc) or the block runs
    unchanged. Callers enable it for CPU work: tensors on a GPU do not come from malloc.

    By default glibc maps every allocation above 32 MB fresh from the kernel and unmaps it when it
    is freed, so a training step that makes the same large tensors every iteration (a ViT-S/14 step's
    685 x 65536 logits, their probabilities and gradients) pays a page fault per 4 KB of each of them,
    every step. Kept in the heap, a DINOv2 ViT-S/14 step on a 2-core CPU is 6-19% faster (bf16 and
    fp32, over several runs), for 7-10% more peak memory, which stays flat over the run
    (`bench/train_throughput.py --peer dinokit-default-malloc`, docs/benchmarks.md). On leaving the
    outermost such block the two settings go back to glibc's default values (its dynamic mmap
    threshold stays where it was) and the freed memory is returned to the system (`malloc_trim`).
    """
    global _reuse_depth
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    if _reuse_depth == 0 and not libc.mallopt(M_MMAP_MAX, 0):
        yield False
        return
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # keep up to 2 GB of free heap
    _reuse_depth += 1
    try:
        yield True
    finally:
        _reuse_depth -= 1
        if _reuse_depth == 0:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)


class StopSignals:
    """A context in which SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption, `kill`) ask a long
    loop to stop rather than kill it: the first one sets `requested` (its name), the loop checks it
    between steps, saves its state and calls `raise_requested`. A second Ctrl-C acts as usual at once
    (KeyboardInterrupt), and so does a SIGTERM after a Ctrl-C; a SIGTERM after a SIGTERM is ignored:
    one stop may reach a process twice (SLURM's proctrack/linuxproc signals every process of a job
    step, and torchrun passes its own SIGTERM on), and those who send SIGTERM follow it with SIGKILL
    when they will not wait. Handlers are set in the main thread only and restored on leaving
    (`restore`: every signal then acts as usual)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self.previous: dict = {}

    def install(self) -> "StopSignals":
        """Set the handlers (in the main thread; elsewhere signals act as usual)."""
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGTERM:  # the same stop delivered twice: ignored until `restore`
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.restore_ctrl_c()
        else:
            self.restore()  # a second signal acts as usual

    def restore_ctrl_c(self) -> None:
        """Give SIGINT its earlier handler back (Ctrl-C acts as usual), SIGTERM's kept until `restore`: a
        loop stopped (here or on another process) while its last checkpoint is written."""
        if signal.SIGINT in self.previous:
            handler = self.previous.pop(signal.SIGINT)
            signal.signal(signal.SIGINT, handler if handler is not None else signal.SIG_DFL)

    def end_loop(self, stopped: bool) -> None:
        """The loop is over: every handler back, or, where a stop ended it (`stopped`, here or on another
        process), Ctrl-C's alone: SIGTERM stays handled (a repeat ignored) until the stop's checkpoint is
        written and `restore` is called."""
        if stopped:
            self.restore_ctrl_c()
        else:
            self.restore()

    def restore(self) -> None:
        """Give the signals their earlier handlers back (idempotent; a signal handled meanwhile finds
        nothing left to restore)."""
        previous, self.previous = self.previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def raise_requested(self) -> None:
        """After the loop saved its state: KeyboardInterrupt for SIGINT, exit status 143 for SIGTERM."""
        if self.requested == "SIGINT":
            raise KeyboardInterrupt
        if self.requested == "SIGTERM":
            raise SystemExit(128 + signal.SIGTERM)

    def end_run(self, command: str, stopped_by: str, iteration: int, out, announce: bool) -> NoReturn:
        """A training run stopped with a checkpoint at `iteration`: say how to resume it (`announce`: on
        process 0), then stop as the signal asks; a process that did not receive it stops too."""
        if announce:
            print(
                f"{command}: stopped by {stopped_by} at iteration {iteration}, checkpoint saved; the same "
                f"command with resume=true continues the run (out={out})"
            )
        self.raise_requested()
        raise KeyboardInterrupt


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: workers leave SIGINT and SIGTERM to the main process, which stops
    the loop cleanly (`StopSignals`) and then ends them; a worker killed first would fail its batch."""
    for s in StopSignals.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
