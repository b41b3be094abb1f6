"""Where and in which precision to run: device choice and autocast, shared by every stage."""

import contextlib

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


def autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CPU and CUDA (the fast path), or nothing for 'fp32'."""
    if precision not in PRECISIONS:
        raise DinokitError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DinokitError("this GPU does not support bf16; use precision=fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16)
