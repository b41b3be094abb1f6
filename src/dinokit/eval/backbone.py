"""`model=` of the evaluation commands: the frozen backbone to evaluate, and a hash of its weights.

Accepted sources:
- any file or folder that `dinokit.load_model` reads: official `.pth`, training checkpoints (the
  teacher), Hugging Face folders, timm files, dinokit safetensors, a dinokit pretraining run folder
  (its `backbone.safetensors`);
- a released name (`dinov2_vits14`, `dino_vitb16`, `facebook/dinov2-small`, ...), downloaded once;
- `random:<architecture>` (e.g. `random:dinov2_vits14`), or a bare architecture name that is not a
  released one (e.g. `vit_tiny_p4`): a randomly initialised network, seeded. A baseline only: its
  features carry no learned meaning, and every result says so.
"""

import hashlib
import json
from pathlib import Path

import torch

from dinokit.errors import DinokitError
from dinokit.models import ARCHITECTURES, VisionTransformer, create_model, load_model
from dinokit.models.hub import official_url

RANDOM_PREFIX = "random:"


def is_random_source(source: str) -> bool:
    """True when `source` names a randomly initialised architecture rather than weights."""
    name = str(source)
    if name.startswith(RANDOM_PREFIX):
        return True
    return name in ARCHITECTURES and official_url(name) is None and not Path(name).exists()


def load_backbone(source: str, device: torch.device | str = "cpu", seed: int = 0) -> tuple[VisionTransformer, str]:
    """(model in eval mode on `device`, one-line description of where it came from)."""
    if is_random_source(source):
        name = str(source).removeprefix(RANDOM_PREFIX)
        if name not in ARCHITECTURES:
            raise DinokitError(f"unknown architecture {name!r} in model={source}; known: {', '.join(ARCHITECTURES)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(name)
        description = f"{name}, RANDOM initialisation (seed {seed}): a baseline, not a trained model"
    else:
        model = load_model(source)
        description = str(source)
    return model.to(device).eval(), description


def weights_hash(model: torch.nn.Module) -> str:
    """Hex digest of the architecture and every weight (names, shapes, dtypes, values)."""
    h = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
