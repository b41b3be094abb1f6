import functools

import pytest
import torch

from dinokit import runtime


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_bf16_cache(monkeypatch):
    """An empty per-GPU cache of bf16 answers for this test, for tests that fake the GPUs or their answers
    (the process's real cache is back afterwards)."""
    monkeypatch.setattr(runtime, "_cuda_native_bf16", functools.cache(runtime._cuda_native_bf16.__wrapped__))


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
