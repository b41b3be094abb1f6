"""Process groups without ceremony: one process needs no collectives, several come from `torchrun`.

`init_distributed(device)` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
...; multi-node rendezvous is torchrun's job) and picks gloo on CPU, nccl on CUDA. Every helper below
is a no-op, not an error, when no process group is running, so losses and the trainer call them
unconditionally.
"""

import datetime
import os

import torch
import torch.distributed as dist

from dinokit.errors import DinokitError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(
    device: torch.device, backend: str | None = None, timeout: datetime.timedelta = datetime.timedelta(minutes=30)
) -> torch.device:
    """Join the torchrun process group (if launched by torchrun and not joined yet) and return this
    process's device (cuda:LOCAL_RANK on GPUs). Backend: nccl for CUDA, gloo otherwise, unless given."""
    device = process_device(device)
    if launched_by_torchrun() and not is_distributed():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, timeout=timeout)
    return device


def process_device(device: torch.device) -> torch.device:
    """This process's device under torchrun: cuda:LOCAL_RANK (made current) for CUDA, else `device`."""
    if device.type != "cuda" or not launched_by_torchrun():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank >= torch.cuda.device_count():
        raise DinokitError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible; lower "
            "--nproc_per_node to the number of GPUs, or run on the CPU with device=cpu"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def destroy_distributed(wait: bool = True) -> None:
    """Leave the process group, after every process got there (`wait`). Pass wait=False when this
    process stops on an error: the others may be in another collective, and a barrier would hang
    this process (and, under torchrun, all of them) instead of letting it exit with its error."""
    if is_distributed():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _collective(tensor: torch.Tensor, op) -> torch.Tensor:
    """Run `op` on `tensor` in place; with NCCL, a CPU tensor makes a round trip through the GPU."""
    if not is_distributed():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        op(on_gpu)
        return tensor.copy_(on_gpu)
    op(tensor)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (identity in a single process); returns the tensor."""
    return _collective(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place maximum over processes (identity in a single process); returns the tensor."""
    return _collective(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s value on every process (identity in a single process)."""
    return _collective(tensor, lambda t: dist.broadcast(t, src=src))


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects; [obj] in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()
