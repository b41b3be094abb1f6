import contextlib
import signal
import subprocess
import sys

import pytest
import torch

from dinokit.errors import DinokitError
from dinokit.runtime import OutOfMemory, bf16_supported, device_out_of_memory, out_of_memory, resolve_device


@pytest.fixture
def two_gpus(monkeypatch):
    """This machine as one with two CUDA GPUs and no MPS, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_device_names_are_checked_against_the_choices_and_the_machine(two_gpus, monkeypatch):
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(" Cuda:1 ") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(DinokitError, match=r"device=gpu is not a device name \(a GPU is device=cuda\); use auto, cpu"):
        resolve_device("gpu")
    with pytest.raises(DinokitError, match=r"has 2 CUDA GPU\(s\); use one of cpu, cuda, cuda:0, cuda:1$"):
        resolve_device("cuda:5")
    with pytest.raises(DinokitError, match=r"MPS \(Apple GPUs\) is not available here; use device=cpu or auto"):
        resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DinokitError, match=r"CUDA is not available here.*\(available here: cpu\)"):
        resolve_device("cuda:0")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.fixture
def fake_gpus(two_gpus, fresh_bf16_cache, monkeypatch):
    """GPU 0 older (bf16 only emulated), GPU 1 newer; returns the `including_emulation` of each question."""
    native = {0: False, 1: True}
    current, calls = [0], []

    @contextlib.contextmanager
    def device(index):
        previous, current[0] = current[0], index
        yield
        current[0] = previous

    def is_bf16_supported(including_emulation: bool = True):
        calls.append(including_emulation)
        return native[current[0]] or including_emulation

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return calls


def test_cuda_bf16_is_asked_of_the_device_used_without_emulation(fake_gpus):
    assert bf16_supported(torch.device("cuda", 1))
    assert not bf16_supported(torch.device("cuda", 0))
    assert fake_gpus == [False, False]
    assert not bf16_supported(torch.device("cuda"))  # the current GPU, 0
    assert bf16_supported(torch.device("cpu")) and not bf16_supported(torch.device("mps"))


def test_each_gpu_is_asked_about_bf16_once(fake_gpus):
    """autocast asks on every training step; the answer per GPU is kept."""
    for _ in range(3):
        assert bf16_supported(torch.device("cuda", 1)) and not bf16_supported(torch.device("cuda", 0))
        assert not bf16_supported(torch.device("cuda"))  # the current GPU, 0: the same answer as cuda:0
    assert len(fake_gpus) == 2


# In a process of its own: the old handling of a repeated SIGTERM killed the process running it.
REPEATED_SIGTERM = """
import os, signal, time
from dinokit.runtime import StopSignals
with StopSignals() as stop:
    for _ in range(2):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes
    print(stop.requested, flush=True)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""


def test_a_repeated_sigterm_is_the_same_stop_and_ctrl_c_after_it_acts_at_once():
    """A SIGTERM after a SIGTERM killed the process before it saved its checkpoint. One stop can reach a
    process twice: SLURM's proctrack/linuxproc signals every process of a job step (torchrun's processes
    too), and torchrun passes its own SIGTERM on."""
    result = subprocess.run([sys.executable, "-c", REPEATED_SIGTERM], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split() == ["SIGTERM", "interrupted", "True"]  # and SIGTERM's handler given back


def test_a_sigterm_handled_while_the_handlers_are_restored_leaves_them_restored(monkeypatch):
    """A SIGTERM can arrive while `restore` gives the handlers back one by one (its handler runs between
    two of them): `restore` still ends with every earlier handler back, without an error."""
    from dinokit.runtime import StopSignals

    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    stop = StopSignals().install()
    set_handler, arrived = signal.signal, []

    def setting(signum, handler):  # the stop's SIGTERM handled once, just after SIGINT's handler is back
        previous = set_handler(signum, handler)
        if signum == signal.SIGINT and not arrived:
            arrived.append(signal.SIGTERM)
            stop._handle(signal.SIGTERM, None)
        return previous

    monkeypatch.setattr(signal, "signal", setting)
    try:
        stop.restore()
        after = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    finally:
        monkeypatch.undo()
        for s, handler in before.items():
            signal.signal(s, handler)
    assert after == before and stop.requested == "SIGTERM"


@pytest.mark.parametrize(
    "error, found",
    [
        (
            torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of 79.19 GiB of which "
                "1.25 GiB is free. Including non-PyTorch memory, this process has 77.89 GiB memory in use."
            ),
            OutOfMemory("cuda:1", "tried to allocate 2.00 GiB, 1.25 GiB free"),
        ),
        (
            torch.OutOfMemoryError(
                "XPU out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 11.93 GiB of which "
                "5.62 MiB is free. Of the allocated memory 10.43 GiB is allocated by PyTorch"
            ),
            OutOfMemory("xpu:0", "tried to allocate 20.00 MiB, 5.62 MiB free"),
        ),
        (
            RuntimeError(
                "MPS backend out of memory (MPS allocated: 17.21 GiB, other allocations: 1.02 GiB, max allowed: "
                "20.13 GiB). Tried to allocate 9.19 MiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0"
            ),
            OutOfMemory("mps", "tried to allocate 9.19 MiB"),
        ),
        (  # a library's allocation outside the caching allocator
            RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
            OutOfMemory("cuda", ""),
        ),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                "tried to allocate 911360 bytes."
            ),
            OutOfMemory("cpu", "tried to allocate 0.87 MiB"),
        ),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), None),
    ],
)
def test_out_of_memory_reads_where_and_how_much_from_what_torch_says(error, found):
    """CUDA and XPU raise torch.OutOfMemoryError, MPS and the CPU allocator a RuntimeError; only a device's
    memory lets work go on in smaller pieces."""
    assert out_of_memory(error) == found
    assert device_out_of_memory(error) == (found is not None and found.device != "cpu")
