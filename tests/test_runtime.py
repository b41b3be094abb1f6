import contextlib

import pytest
import torch

from dinokit.errors import DinokitError
from dinokit.runtime import bf16_supported, resolve_device


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


def test_cuda_bf16_is_asked_of_the_device_used_without_emulation(two_gpus, monkeypatch):
    native = {0: False, 1: True}  # an older GPU 0 (bf16 only emulated), a newer GPU 1
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
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert bf16_supported(torch.device("cuda", 1))
    assert not bf16_supported(torch.device("cuda", 0))
    assert not bf16_supported(torch.device("cuda"))  # the current GPU, 0
    assert calls == [False, False, False]
    assert bf16_supported(torch.device("cpu")) and not bf16_supported(torch.device("mps"))
