"""Defects found reviewing the reduced JPEG decode, the k-NN monitor and the released linear heads."""

from pathlib import Path

import pytest
import yaml

from dinokit.errors import DinokitError


def saved_without(out: Path, settings: dict, key: str) -> None:
    """A run folder whose config.yaml predates `key` (as a run started before the key existed)."""
    out.mkdir(parents=True)
    values = {k: v for k, v in settings.items() if k != key}
    (out / "config.yaml").write_text(yaml.safe_dump({**values, "out": str(out)}))


def test_a_pretraining_run_saved_before_reduced_decode_resumes_decoding_whole(tmp_path):
    """Such a run decoded its JPEGs whole: resumed, it must go on doing so (not switch to today's
    default), and reduced_decode=false must not be refused as a change of its settings."""
    from dinokit.train.config import resolve_config
    from dinokit.train.pretrain import run_config

    out = tmp_path / "run"
    saved_without(out, resolve_config("cpu32", {}).to_dict(), "reduced_decode")
    assert run_config(out, None, {}, resume=True)[0].reduced_decode is False
    assert run_config(out, None, {"reduced_decode": False}, resume=True)[0].reduced_decode is False
    with pytest.raises(DinokitError, match="reduced_decode"):
        run_config(out, None, {"reduced_decode": True}, resume=True)


def test_a_finetuning_run_saved_before_reduced_decode_resumes_decoding_whole(tmp_path):
    from dinokit.train.finetune import run_config
    from dinokit.train.finetune_config import resolve_config

    out = tmp_path / "run"
    settings = resolve_config({"model": "random:vit_micro_p4", "train": "a", "val": "b"}).to_dict()
    saved_without(out, settings, "reduced_decode")
    assert run_config(out, {}, resume=True)[0].reduced_decode is False
    assert run_config(out, {"reduced_decode": False}, resume=True)[0].reduced_decode is False
