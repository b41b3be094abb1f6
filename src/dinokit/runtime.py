"""Where and in which precision to run: device choice and autocast, shared by every stage."""

import contextlib
import warnings

import torch

from dinokit.errors import DinokitError

PRECISIONS = ("bf16", "fp32")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu. A requested device that is absent is an error."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DinokitError(f"device={device} requested but CUDA is not available here; use device=cpu or auto")
    return dev


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs on `device`: always on the CPU, on CUDA GPUs that support bf16."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


_warned_fp32: set[str] = set()  # device types already warned about (one warning per process)


def autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CPU and CUDA where supported (the fast path), or nothing for 'fp32'. Where
    bf16 is not supported (an older GPU, MPS), run in fp32 and warn once."""
    if precision not in PRECISIONS:
        raise DinokitError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if not bf16_supported(device):
        if device.type not in _warned_fp32:
            _warned_fp32.add(device.type)
            warnings.warn(
                f"bf16 autocast is not supported on this device ({device}); running in fp32. "
                "Pass precision=fp32 to silence this warning.",
                stacklevel=2,
            )
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
