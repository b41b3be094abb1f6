"""Start-up: `dinokit --help` imports no torch, and `dinokit <command> --help` none of the heavy modules
that showing keys does not need (torchvision alone is over a second; docs/benchmarks.md, Start-up).

One subprocess imports `dinokit.cli`, builds the main help, then every command's help as `dinokit <command>
--help` does, and reports the heavy modules each step imported first.
"""

import json
import subprocess
import sys

import pytest

from dinokit.cli import COMMANDS

# heavy to import, and not needed to list a command's keys (torch._dynamo: torchvision's second)
HEAVY = (
    "torchvision",
    "torch._dynamo",
    "transformers",
    "timm",
    "huggingface_hub",
    "faiss",
    "sklearn",
    "scipy",
    "skimage",
    "matplotlib",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "tensorboard",
    "torch.utils.tensorboard",
    "cv2",
    "lightly",
    "pandas",
)

# What some commands' help still imports: names that tests replace on the command's module keep their
# import at its top, and the module they come from imports the heavy one at its own top. The eval and
# predict modules import data.transforms (torchvision) and maps/render.py matplotlib in the functions
# that use them, so those helps import neither.
# curation/commands.py: FeatureIndex, normalise, ... <- retrieval/index.py, which imports faiss at its top
# (0.03 s)
CURATION = {"faiss"}
STILL_IMPORTED = {
    "curate dedup": CURATION,
    "curate cluster": CURATION,
    "curate sample": CURATION,
    "curate retrieve": CURATION,
}

PROBE = """
import json, sys
heavy = json.loads(sys.argv[1])
seen = set(sys.modules)
def new(names):
    global seen
    found = [m for m in names if m in sys.modules and m not in seen]
    seen = set(sys.modules)
    return found
import dinokit.cli as cli
cli.main_help()
report = {"dinokit --help": new([*heavy, "torch", "numpy", "PIL"])}
for name in json.loads(sys.argv[2]):
    cli.command_help(name, cli.resolve_command(name))
    report[name] = new(heavy)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def imported() -> dict[str, list[str]]:
    """{'dinokit --help' or a command: the heavy modules its help imported first}; the commands without
    STILL_IMPORTED go first, so that what they import is theirs alone."""
    order = sorted(COMMANDS, key=lambda name: name in STILL_IMPORTED)
    run = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(HEAVY), json.dumps(order)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_main_help_imports_no_torch(imported):
    assert imported["dinokit --help"] == []


def test_command_help_imports_no_heavy_module(imported):
    assert set(imported) == {"dinokit --help", *COMMANDS}
    extra = {
        name: sorted(set(found) - STILL_IMPORTED.get(name, set()))
        for name, found in imported.items()
        if name != "dinokit --help"
    }
    assert {name: found for name, found in extra.items() if found} == {}
