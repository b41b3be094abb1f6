"""Security and data safety: what dinokit may remove or overwrite in a folder it is given, paths it
reads back, files it refuses to unpickle. Each test is a defect that was found and fixed."""

import json

import pytest

from dinokit.cli import main
from dinokit.data.synthetic import write_dense_set

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY_DENSE = ["model=random:vit_nano_p2", "image_size=16", "epochs=1", "cache=none", "num_workers=0", "precision=fp32"]


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_eval_dense_never_removes_files_it_did_not_write(task, tmp_path, capsys):
    """`dinokit eval segmentation|depth out=F` removed F/examples/ (whole), F/metrics.jsonl and
    F/<task>_head.safetensors before writing its own, whoever had written them: out=. in a project
    folder deleted its examples/ folder. They are now removed only where an earlier eval run of that
    task wrote them; a folder holding such files of anyone else is refused, untouched."""
    train = write_dense_set(tmp_path / "train", 3, size=16, seed=0)
    val = write_dense_set(tmp_path / "val", 3, size=16, seed=1)
    extra = ["max_depth=10"] if task == "depth" else ["num_classes=9"]
    out = tmp_path / "project"
    (out / "examples").mkdir(parents=True)
    (out / "examples" / "notes.py").write_text("print('mine')\n")
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    args = ["eval", task, f"train={train}", f"val={val}", f"out={out}", *TINY_DENSE, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "examples" in err and "metrics.jsonl" in err and "choose another out folder" in err
    assert (out / "examples" / "notes.py").read_text() == "print('mine')\n"
    assert (out / "metrics.jsonl").read_text() == '{"mine": 1}\n'
    # a new folder, then a rerun into it: the earlier run's files are its own and are replaced
    fresh = tmp_path / "fresh"
    args[4] = f"out={fresh}"
    assert main(args) == 0 and main([*args, "num_examples=1"]) == 0
    assert len(list((fresh / "examples").iterdir())) == 1
    assert json.loads((fresh / f"{task}.json").read_text())["examples"]
