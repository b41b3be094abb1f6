"""Process groups without ceremony: one process needs no collectives, several come from `torchrun`.

`init_distributed(device)` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
...; multi-node rendezvous is torchrun's job) and picks gloo on CPU, nccl on CUDA. Every helper below
is a no-op, not an error, when no process group is running, so losses and the trainer call them
unconditionally.
"""

import contextlib
import datetime
import gc
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from dinokit.errors import DinokitError, SharedError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

SHARED_ERROR_WAIT_S = 10.0  # how long a process other than 0 leaves process 0 to print an error they share
_joined = False  # whether this process joined a process group (it stays True after leaving it)
_meshes: list["DeviceMesh"] = []  # device meshes made by `device_mesh`, let go of by `destroy_distributed`


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


def launched_as_process_0() -> bool:
    """Whether this is process 0 of its job as torchrun numbered it (RANK), known before it joins the
    process group; True outside torchrun. Notices that every process would print go out on it alone."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(
    device: torch.device, backend: str | None = None, timeout: datetime.timedelta = datetime.timedelta(minutes=30)
) -> torch.device:
    """Join the torchrun process group (if launched by torchrun and not joined yet) and return this
    process's device (cuda:LOCAL_RANK on GPUs). Backend: nccl for CUDA, gloo otherwise, unless given."""
    global _joined
    device = process_device(device)
    if launched_by_torchrun() and not is_distributed():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        unpin_default_group()
        dist.init_process_group(backend=backend, timeout=timeout)
        _joined = True
    return device


def unpin_default_group() -> None:
    """Import torch.distributed.nn before the process group exists, so that `destroy_distributed` ends it.

    Its functions take `group=group.WORLD` as a default argument, evaluated at import: imported while
    a group runs (DDP's first use imports torch._dynamo, which imports it), they hold that group for
    good, and destroy_process_group then leaves gloo's worker threads running into the interpreter's
    exit. There, a worker that still holds the last collective's tensors (it lets go of them after
    waking the waiter) may take the GIL to free them and be ended mid-destructor: SIGABRT, 'terminate
    called without an active exception' (pytorch/pytorch#190489). Imported first, the defaults are None.
    """
    import torch.distributed.nn  # noqa: F401


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


def device_mesh(device: torch.device) -> "DeviceMesh":
    """A 1-D DeviceMesh over every process, on the default process group: the mesh FSDP2's fully_shard
    makes when given none, made here so that `destroy_distributed` can let go of it.

    A mesh holds its process groups, and DTensor's sharding caches keep every mesh an optimizer step
    went through alive for good: destroy_process_group then leaves gloo's worker threads running into
    the interpreter's exit, where they may abort the process (see `unpin_default_group`)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size(),))
    _meshes.append(mesh)
    return mesh


def destroy_distributed(wait: bool = True) -> None:
    """Leave the process group, after every process got there (`wait`). Pass wait=False when this
    process stops on an error: the others may be in another collective, and a barrier would hang
    this process (and, under torchrun, all of them) instead of letting it exit with its error."""
    if is_distributed():
        if wait:
            dist.barrier()
        for mesh in _meshes:
            getattr(mesh, "_pg_registry", {}).clear()  # its process groups (torch has no public way to let go)
        _meshes.clear()
        dist.destroy_process_group()
        gc.collect()  # models that ran DDP / FSDP2 hold the group too, in reference cycles: free them now


def leave_shared_error_to_process_0(shared: bool) -> None:
    """Called before a process prints the error it stops with, so that a torchrun job prints an error
    that every process raises once, on process 0 (at once), not once per process.

    A process other than 0 waits up to SHARED_ERROR_WAIT_S before it prints such an error: process 0
    prints it and exits, and torchrun then stops the other processes. Shared are the errors raised
    before this process joined the process group (they follow from the command line, the config and
    the files every process reads) and `shared` ones (`SharedError`: from values the processes
    exchanged, or raised alike by every process in a `compare_errors` block after joining). An error
    of this process alone before joining (LOCAL_RANK beyond its node's GPUs, say) is printed after the
    wait, as process 0 meanwhile waits for it to join and does not end the job. Other errors after
    joining are printed at once: this process has left the group (`destroy_distributed(wait=False)`),
    so a collective of process 0 fails, ending the job, and the wait would hide the error. Telling the
    two apart there would need a collective, which could hang: the others may be waiting in another
    one; `compare_errors` asks where every process is known to run the same code up to its gather.
    """
    if launched_by_torchrun() and not launched_as_process_0() and (shared or not _joined):
        time.sleep(SHARED_ERROR_WAIT_S)


@contextlib.contextmanager
def compare_errors() -> Iterator[None]:
    """Run a block that every process runs alike after joining the process group (reading the same
    settings and files, with no collective inside), then compare how it ended in every process (one
    all_gather), so that an error is printed once where every process has it, and no process goes on
    to a collective that a stopped one never joins:
    - every process raised a DinokitError with the same message: each raises it as a SharedError,
      which process 0 alone prints (`leave_shared_error_to_process_0`), as errors before joining are;
    - some raised: each of those raises its own error as it is (printed by it at once), and the
      others stop with a SharedError naming the failed processes and their errors;
    - none raised: the work goes on.
    Where the gather itself fails (another process died meanwhile), a process that raised keeps its own
    error. Outside a process group, the block just runs."""
    if not is_distributed():
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # not KeyboardInterrupt: Ctrl-C reaches every process, which stop at once
        error = e
    try:
        outcomes = all_gather_objects(None if error is None else describe_error(error))
    except Exception:
        if error is None:
            raise
        outcomes = None  # the comparison failed (another process died meanwhile): this process's own error
    if outcomes is None:
        raise error
    failed = {r: message for r, message in enumerate(outcomes) if message is not None}
    if error is None:
        if failed:
            raise SharedError(
                "stopping, as " + "; ".join(f"process {r} failed: {message}" for r, message in failed.items())
            )
        return
    alike = len(failed) == len(outcomes) and len(set(failed.values())) == 1
    if alike and isinstance(error, DinokitError) and not isinstance(error, SharedError):
        raise SharedError(str(error)) from error
    raise error


def describe_error(error: Exception) -> str:
    """How another process names `error`: a DinokitError's message, else the type and message."""
    return str(error) if isinstance(error, DinokitError) else f"{type(error).__name__}: {error}"


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
