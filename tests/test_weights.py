"""Formats dinokit reads and writes, and the errors users get for bad files."""

import argparse
import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dinokit
from dinokit import ARCHITECTURES, VisionTransformer, ViTConfig
from dinokit.errors import DinokitError
from dinokit.models import hub
from dinokit.models.loading import read_checkpoint
from tests.conftest import dead_writer_tag, perturb_scales_and_norms


@pytest.fixture
def model():
    return perturb_scales_and_norms(dinokit.create_model("dinov2_vits14_reg", depth=2, img_size=56)).eval()


def same_outputs(a, b, size=56) -> bool:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.equal(a.forward_features(x)["x_prenorm"], b.forward_features(x)["x_prenorm"])


@pytest.mark.parametrize("fmt", ["dinokit", "official", "hf"])
def test_round_trip_is_exact(tmp_path, model, fmt):
    path = dinokit.export_model(model, tmp_path / ("m.pth" if fmt == "official" else "m"), format=fmt)
    loaded = dinokit.load_model(path)
    assert loaded.config == model.config
    assert same_outputs(model, loaded)
    assert not loaded.training


def test_export_format_follows_the_name_of_out_and_a_contradiction_is_an_error(tmp_path, model, capsys):
    from dinokit.cli import main
    from dinokit.models.loading import export_format

    src = dinokit.export_model(model, tmp_path / "src.safetensors")
    assert main(["export", f"model={src}", f"out={tmp_path / 'y.pth'}"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "y.pth")
    assert "blocks.0.attn.qkv.weight" in torch.load(tmp_path / "y.pth", weights_only=True)  # official, not renamed
    assert dinokit.export_model(model, tmp_path / "hf") == str(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    assert same_outputs(model, dinokit.load_model(tmp_path / "hf"))
    assert [export_format(f"m{s}") for s in (".safetensors", ".pth", ".PT", ".onnx", "")] == [
        "dinokit",
        "official",
        "official",
        "onnx",
        "hf",
    ]
    assert export_format("m.pt", "torchscript") == "torchscript" and export_format("m", "dinokit") == "dinokit"
    with pytest.raises(
        DinokitError,
        match=r"format=official writes a \.pth file, but .*y\.safetensors is named as a "
        r"\.safetensors file \(format=dinokit\): drop format= to write dinokit",
    ):
        dinokit.export_model(model, tmp_path / "y.safetensors", format="official")
    assert main(["export", f"model={src}", f"out={tmp_path / 'z.pth'}", "format=dinokit"]) == 2
    assert "format=dinokit writes a .safetensors file, but" in capsys.readouterr().err
    assert main(["export", f"model={src}", f"out={tmp_path / 'z.bin'}"]) == 2
    assert "cannot tell the export format from" in capsys.readouterr().err
    assert main(["export", f"model={src}", f"out={tmp_path / 'z.bin'}", "format=dinokit"]) == 2  # not renamed
    assert "format=dinokit writes a .safetensors file, but" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "src.safetensors", "y.pth"]


def test_official_layout_has_the_official_keys(tmp_path, model):
    path = dinokit.export_model(model, tmp_path / "dinov2_vits14_reg4_pretrain.pth", format="official")
    sd = torch.load(path, weights_only=True)
    assert {
        "cls_token",
        "pos_embed",
        "register_tokens",
        "mask_token",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.1.ls2.gamma",
        "norm.bias",
    } <= set(sd)
    assert sd["pos_embed"].shape == (1, 17, 384)


def test_official_file_architecture_is_detected_without_config(tmp_path):
    for name in ("dinov2_vitb14", "dinov2_vits14_reg", "dino_vits8"):
        with torch.device("meta"):
            cfg = dinokit.create_model(name).config
        m = dinokit.create_model(name, depth=2)
        torch.save(m.state_dict(), tmp_path / "w.pth")
        loaded = dinokit.load_model(tmp_path / "w.pth")
        for field in (
            "embed_dim",
            "num_heads",
            "patch_size",
            "img_size",
            "num_register_tokens",
            "interpolate_offset",
            "interpolate_antialias",
            "ffn_layer",
            "mask_token",
        ):
            assert getattr(loaded.config, field) == getattr(cfg, field), (name, field)
        assert (loaded.config.init_values is None) == (cfg.init_values is None)


def test_training_checkpoints_teacher_prefixes_heads_and_block_chunks(tmp_path, model):
    sd = model.state_dict()
    chunked = {}
    for k, v in sd.items():  # block_chunks=2 layout: blocks.<chunk>.<global index>.
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{i}." + k.split(".", 2)[2]
        chunked[f"backbone.{k}"] = v
    teacher = {
        **chunked,
        "dino_head.mlp.0.weight": torch.randn(8, 384),
        "ibot_head.last_layer.weight": torch.randn(4, 8),
    }
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    assert same_outputs(model, dinokit.load_model(tmp_path / "teacher_checkpoint.pth"))
    # DINO v1 checkpoint.pth: student under DDP (`module.`), teacher plain; the teacher is loaded
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    v1 = {
        "student": {f"module.backbone.{k}": v for k, v in other.items()},
        "teacher": {f"backbone.{k}": v for k, v in sd.items()} | {"head.last_layer.weight_g": torch.ones(3, 1)},
        "epoch": 3,
    }
    torch.save(v1, tmp_path / "checkpoint.pth")
    assert same_outputs(model, dinokit.load_model(tmp_path / "checkpoint.pth"))


def test_dinokit_pretraining_checkpoints_load_as_their_teacher(tmp_path):
    """A checkpoint of `dinokit pretrain` (run/checkpoints/checkpoint_*.pt) holds the loss centers
    (`dino_center.center`, `ibot_center.center`) beside student and teacher: load_model refused it as an
    official file with an unexpected key."""
    from pretrain_helpers import TINY, tiny_images

    data = tiny_images(tmp_path / "data")
    dinokit.pretrain(data=str(data), out=str(tmp_path / "run"), **{**TINY, "max_iterations": 2, "checkpoint_every": 2})
    teacher = dinokit.load_model(tmp_path / "run" / "checkpoints" / "checkpoint_00000002.pt")
    assert same_outputs(dinokit.load_model(tmp_path / "run"), teacher, size=16)


def test_dino_v1_checkpoint_with_its_args_namespace_loads(tmp_path):
    """DINO v1 main_dino.py saves `args` (an argparse.Namespace) beside the weights; weights_only=True
    refused the whole file."""
    m = perturb_scales_and_norms(dinokit.create_model("dino_vits16", depth=1, img_size=32)).eval()
    sd = m.state_dict()
    ckpt = {
        "student": {f"module.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()},
        "teacher": {f"backbone.{k}": v for k, v in sd.items()},
        "optimizer": {},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, lr=0.0005, data_path="/data/train"),
        "dino_loss": {"center": torch.zeros(1, 8)},
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    assert same_outputs(m, dinokit.load_model(tmp_path / "checkpoint.pth"), size=32)


@pytest.mark.parametrize("teacher_first", [True, False])
def test_teacher_wins_over_the_student_in_one_training_dict(tmp_path, model, teacher_first):
    """DINOv2 training checkpoints hold `student.backbone.*` and `teacher.backbone.*` in one `model`
    dict; stripping both prefixes let whichever came last win."""
    teacher = {f"teacher.backbone.{k}": v for k, v in model.state_dict().items()}
    student = {f"student.backbone.{k}": v + 1 for k, v in model.state_dict().items()}
    both = {**teacher, **student} if teacher_first else {**student, **teacher}
    torch.save({"model": both, "iteration": 3}, tmp_path / "model_0000003.pth")
    assert same_outputs(model, dinokit.load_model(tmp_path / "model_0000003.pth"))


def test_pretraining_run_folder_loads_its_backbone(tmp_path, model):
    dinokit.export_model(model, tmp_path / "backbone.safetensors")
    assert same_outputs(model, dinokit.load_model(tmp_path))


def test_missing_and_unexpected_keys_are_listed_with_the_nearest_architecture(tmp_path, model):
    sd = model.state_dict()
    del sd["blocks.1.attn.proj.weight"]
    sd["blocks.1.attn.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(DinokitError) as e:
        dinokit.load_model(tmp_path / "broken.pth")
    msg = str(e.value)
    assert "blocks.1.attn.proj.weight" in msg and "blocks.1.attn.extra.weight" in msg
    assert "nearest known architecture: dinov2_vits14_reg" in msg


def test_shape_mismatch_is_reported(tmp_path, model):
    sd = model.state_dict()
    sd["blocks.0.mlp.fc2.bias"] = torch.zeros(5)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(DinokitError, match=r"blocks.0.mlp.fc2.bias: file \(5,\) vs model \(384,\)"):
        dinokit.load_model(tmp_path / "bad.pth")


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_truncated_and_empty_files_get_clear_errors(tmp_path, model, suffix):
    path = tmp_path / f"m.{suffix}"
    if suffix == "pth":
        torch.save(model.state_dict(), path)
    else:
        save_file(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DinokitError, match="corrupt or truncated"):
        dinokit.load_model(path)
    path.write_bytes(b"")
    with pytest.raises(DinokitError, match="empty"):
        dinokit.load_model(path)
    path.write_bytes(b"this is not a weights file at all" * 10)
    with pytest.raises(DinokitError, match="not a PyTorch/safetensors weights file"):
        dinokit.load_model(path)


def test_files_that_are_not_weights_are_named_by_their_first_bytes(tmp_path, model, capsys):
    from PIL import Image

    from dinokit.cli import main

    page = tmp_path / "dinov2_vits14_pretrain.pth"
    page.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n")
    with pytest.raises(
        DinokitError,
        match=r"pretrain\.pth is not a PyTorch/safetensors weights file \(corrupt or wrong "
        r"download\?\): it starts with b'<!DOCTYP'.*web page \(HTML\)",
    ):
        dinokit.load_model(page)
    photo = tmp_path / "cat.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    assert main(["info", f"model={photo}"]) == 2
    err = capsys.readouterr().err
    assert "cat.jpg is not a PyTorch/safetensors weights file" in err and "Traceback" not in err
    assert "Weights only load failed" not in err and len(err.splitlines()) == 1
    # the content decides, not the name: safetensors saved as .pth, and torch's legacy (pickle) format
    save_file(model.state_dict(), tmp_path / "st.pth")
    torch.save(model.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("st.pth", "legacy.pth"):
        with pytest.warns(UserWarning, match="guessed num_heads"):  # the fixture is no named architecture
            loaded = dinokit.load_model(tmp_path / name)
        assert same_outputs(model, loaded), name


class Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(DinokitError, match="never unpickles"):
        dinokit.load_model(path)
    assert "arbitrary code ran" not in capsys.readouterr().out
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(DinokitError):
        dinokit.load_model(tmp_path / "raw.pkl")


def test_not_a_backbone(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "w.pth")
    with pytest.raises(DinokitError, match="not a ViT backbone"):
        dinokit.load_model(tmp_path / "w.pth")
    with pytest.raises(DinokitError, match="file not found"):
        dinokit.load_model(tmp_path / "nope.pth")


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    """`weights/missing.pth` has one slash, so it was looked up as a Hub id and reported as offline."""
    monkeypatch.chdir(tmp_path)
    hub_ids = []
    monkeypatch.setattr(hub, "_download_hub", lambda repo_id: hub_ids.append(repo_id) or tmp_path)
    (tmp_path / "runs").mkdir()
    for name, why in [
        ("weights/missing.pth", f"there is no folder {tmp_path / 'weights'}"),
        ("weights/missing.safetensors", "no folder"),
        ("missing.bin", f"{tmp_path} has no missing.bin"),
        ("runs/typo", f"{tmp_path / 'runs'} has no typo"),  # no extension, but its folder exists here
    ]:
        with pytest.raises(DinokitError, match="file not found") as e:
            dinokit.load_model(name)
        assert name in str(e.value) and why in str(e.value) and "offline" not in str(e.value)
    assert hub_ids == []
    assert hub.resolve("facebook/dinov2-small") == tmp_path  # a Hub id still goes to the Hub
    assert hub_ids == ["facebook/dinov2-small"]


def test_bad_out_paths_fail_up_front_with_the_fix(tmp_path, monkeypatch, capsys, model):
    from dinokit.cli import main

    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(DinokitError, match=r"is an existing folder.*Pass a file path instead, e\.g\. .*model\.pth"):
        dinokit.export_model(model, tmp_path / "folder", format="official")
    with pytest.raises(DinokitError, match=r"is an existing file.*Pass a folder path instead"):
        dinokit.export_model(model, tmp_path / "afile", format="hf")
    for fmt, name in (("official", "m.pth"), ("dinokit", "m.safetensors"), ("hf", "m")):
        with pytest.raises(DinokitError, match=r"afile is a file, not a folder\. Pass a path in a folder"):
            dinokit.export_model(model, tmp_path / "afile" / "sub" / name, format=fmt)
    monkeypatch.setattr("dinokit.io.os.access", lambda *a: False)  # as a read-only folder (tests may run as root)
    with pytest.raises(DinokitError, match=r"no permission to write in .*Pass a path in a folder you can write to"):
        dinokit.export_model(model, tmp_path / "new" / "m.pth", format="official")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]  # nothing written, no folder made
    assert list((tmp_path / "folder").iterdir()) == []
    weights = dinokit.export_model(model, tmp_path / "m.safetensors")
    monkeypatch.setattr("dinokit.models.commands.load_model", lambda *a: pytest.fail("loaded before checking out="))
    for out, fmt in (("folder", "official"), ("folder", "torchscript"), ("afile", "hf")):
        assert main(["export", f"model={weights}", f"out={tmp_path / out}", f"format={fmt}"]) == 2
        assert "dinokit: error: cannot write to" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "img_size"), [("vit_micro_p4", None), ("vit_micro_p4", 16), ("vit_micro_p8", None), ("vit_nano_p2", None)]
)
def test_official_export_of_a_named_architecture_reloads_as_the_same_model(tmp_path, name, img_size):
    """Heads and interpolation are not in the weights: they come from the named architecture of the
    same shape (vit_micro_p4 used to come back with 1 head, offset 0.1 and no antialias), whatever its
    position grid (img_size 16: as `cpu32` pretrains it, on 16 px global crops)."""
    overrides = {"img_size": img_size} if img_size else {}
    m = perturb_scales_and_norms(dinokit.create_model(name, **overrides)).eval()
    with torch.no_grad():
        m.pos_embed.normal_()
    path = dinokit.export_model(m, tmp_path / "m.pth", format="official")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing guessed, so no warning
        back = dinokit.load_model(path)
    assert back.config == ViTConfig(**{**m.config.to_dict(), "init_values": back.config.init_values})
    native, p = m.config.img_size, m.patch_size
    assert same_outputs(m, back, size=native)
    assert same_outputs(m, back, size=native + 2 * p)


def test_heads_and_interpolation_of_an_unnamed_shape_are_guessed_with_a_warning(tmp_path):
    m = perturb_scales_and_norms(dinokit.create_model("vit_micro_p4", depth=2)).eval()  # no named 2-block micro
    torch.save(m.state_dict(), tmp_path / "m.pth")
    with pytest.warns(UserWarning, match=r"guessed num_heads=1, interpolate_offset=0.1.*load_model\(path, num_heads="):
        assert dinokit.load_model(tmp_path / "m.pth").config.num_heads == 1
    with pytest.warns(UserWarning, match=r"guessed interpolate_antialias=False\."):
        dinokit.load_model(tmp_path / "m.pth", num_heads=3, interpolate_offset=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = dinokit.load_model(tmp_path / "m.pth", num_heads=3, interpolate_offset=0.0, interpolate_antialias=True)
    assert same_outputs(m, back, size=40)


def test_custom_heads_are_an_override(tmp_path):
    m = dinokit.create_model("vit_micro_p4", depth=2)  # 96-dim, 3 heads: not D/64
    torch.save(m.state_dict(), tmp_path / "m.pth")
    with pytest.warns(UserWarning, match="guessed"):
        assert dinokit.load_model(tmp_path / "m.pth").config.num_heads == 1
    assert dinokit.load_model(tmp_path / "m.pth", num_heads=3).config.num_heads == 3
    with pytest.raises(DinokitError, match="unknown architecture options"):
        dinokit.load_model(tmp_path / "m.pth", heads=3)


def test_released_names_map_to_official_urls_and_hub_ids():
    assert (
        hub.official_url("dinov2_vits14")
        == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    )
    assert (
        hub.official_url("dinov2_vitg14_reg")
        == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"
    )
    assert (
        hub.official_url("dino_vitb8")
        == "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
    )
    assert hub.HF_NAMES["dinov2_vitl14_reg"] == "facebook/dinov2-with-registers-large"


def test_offline_download_error_says_how_to_pass_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torch.hub.download_url_to_file", no_network)
    with pytest.raises(DinokitError, match=r"offline.*local\s+path"):
        dinokit.load_model("dinov2_vits14")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DinokitError, match="offline"):
        dinokit.load_model("facebook/dinov2-small")
    with pytest.raises(DinokitError, match="nor is it a released model name"):
        dinokit.load_model("dinov2_vitz14")


def test_cached_download_is_used_without_network(tmp_path, monkeypatch, model):
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    monkeypatch.setattr("torch.hub.download_url_to_file", lambda *a, **k: pytest.fail("downloaded again"))
    assert same_outputs(model, dinokit.load_model("dinov2_vits14_reg"))


def fake_hub_repo(monkeypatch, repo: Path) -> None:
    """`huggingface_hub.snapshot_download` of a Hub repo whose files are those of the folder `repo`: the
    files that allow_patterns select (matched as the Hub matches them) are copied into one snapshot folder."""
    from huggingface_hub.utils import filter_repo_objects

    def snapshot_download(repo_id, allow_patterns=None, cache_dir=None, **kwargs):
        snapshot = Path(cache_dir) / repo_id.replace("/", "--")
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects(sorted(p.name for p in repo.iterdir()), allow_patterns=allow_patterns):
            shutil.copy(repo / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)


@pytest.mark.parametrize("layout", ["safetensors and bin", "bin", "sharded bin"])
def test_a_hub_repo_with_only_pytorch_model_bin_is_downloaded(tmp_path, monkeypatch, model, layout):
    """Hub ids were fetched with config.json and *.safetensors only, so a repo that holds only
    pytorch_model.bin (sharded or not) came down as a lone config.json that did not load."""
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))
    repo = Path(dinokit.export_model(model, tmp_path / "repo", format="hf"))
    sd = load_file(repo / "model.safetensors")
    if layout == "sharded bin":
        keys = sorted(sd)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, part in shards.items():
            torch.save({k: sd[k] for k in part}, repo / name)
        weight_map = {k: name for name, part in shards.items() for k in part}
        (repo / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        bin_files = [*shards, "pytorch_model.bin.index.json"]
    else:
        torch.save(sd, repo / "pytorch_model.bin")
        bin_files = ["pytorch_model.bin"]
    if layout != "safetensors and bin":
        (repo / "model.safetensors").unlink()
    (repo / "README.md").write_text("a model card, never fetched")
    fake_hub_repo(monkeypatch, repo)
    fetched = sorted(p.name for p in hub.resolve("someone/tiny-dinov2").iterdir())
    # where the repo has safetensors, its .bin is never fetched
    assert fetched == sorted(
        ["config.json", *(["model.safetensors"] if layout == "safetensors and bin" else bin_files)]
    )
    assert same_outputs(model, dinokit.load_model("someone/tiny-dinov2"))


def test_format_detection(tmp_path, model):
    dinokit.export_model(model, tmp_path / "a.safetensors")
    dinokit.export_model(model, tmp_path / "b.pth", format="official")
    dinokit.export_model(model, tmp_path / "hf", format="hf")
    assert [read_checkpoint(p)[2] for p in (tmp_path / "a.safetensors", tmp_path / "b.pth", tmp_path / "hf")] == [
        "dinokit",
        "official",
        "hf",
    ]


@pytest.mark.parametrize("key", ["blocks.0.mlp.fc1.weight", "cls_token"])
def test_a_missing_key_is_reported_with_the_nearest_architecture(tmp_path, model, key):
    sd = model.state_dict()
    del sd[key]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(DinokitError) as e:
        dinokit.load_model(tmp_path / "partial.pth")
    msg = str(e.value)
    assert f"Missing keys (1): {key}" in msg
    assert "nearest known architecture: dinov2_vits14_reg" in msg


def test_official_swiglu_layout_is_detected(tmp_path):
    cfg = ViTConfig(img_size=28, patch_size=14, embed_dim=128, depth=2, num_heads=2, ffn_layer="swiglu")
    ours = perturb_scales_and_norms(VisionTransformer(cfg)).eval()
    path = dinokit.export_model(ours, tmp_path / "swiglu.pth", format="official")
    assert "blocks.1.mlp.w12.weight" in torch.load(path, weights_only=True)
    loaded = dinokit.load_model(path)
    assert loaded.config.ffn_layer == "swiglu" and read_checkpoint(path)[2] == "official"
    assert same_outputs(ours, loaded, size=28)
    assert same_outputs(ours, loaded, size=42)


def test_teacher_checkpoint_with_ddp_backbone_prefixes(tmp_path, model):
    teacher = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
    teacher["module.dino_head.last_layer.weight"] = torch.randn(4, 8)
    torch.save({"teacher": teacher, "iteration": 10}, tmp_path / "teacher_checkpoint.pth")
    assert same_outputs(model, dinokit.load_model(tmp_path / "teacher_checkpoint.pth"))


def test_interpolation_settings_of_the_released_variants():
    v2, reg, v1 = (ARCHITECTURES[n] for n in ("dinov2_vits14", "dinov2_vits14_reg", "dino_vits16"))
    assert (v2.interpolate_offset, v2.interpolate_antialias) == (0.1, False)
    assert (reg.interpolate_offset, reg.interpolate_antialias) == (0.0, True)
    assert (v1.interpolate_offset, v1.interpolate_antialias) == (0.1, False)
    assert v1.init_values is None and v1.img_size == 224 and v1.patch_size == 16
    assert v2.init_values == 1.0 and reg.num_register_tokens == 4


def test_timm_dinov2_without_registers_is_detected_as_timm(tmp_path, model):
    timm = pytest.importorskip("timm")
    tm = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28, depth=2)
    assert tm.state_dict()["pos_embed"].shape[1] == 5  # a CLS row, as the official layout
    torch.save(tm.state_dict(), tmp_path / "timm.pth")
    assert read_checkpoint(tmp_path / "timm.pth")[2] == "timm"
    for name in ("dinov2_vits14", "dinov2_vits14_reg", "dino_vits16"):
        path = dinokit.export_model(dinokit.create_model(name, depth=1), tmp_path / f"{name}.pth", format="official")
        assert read_checkpoint(path)[2] == "official", name
    assert read_checkpoint(dinokit.export_model(model, tmp_path / "m.safetensors"))[2] == "dinokit"


def test_corrupt_or_incomplete_hf_config_gets_a_clear_error(tmp_path, model):
    folder = Path(dinokit.export_model(model, tmp_path / "hf", format="hf"))
    config = folder / "config.json"
    good = json.loads(config.read_text())
    config.write_text('{"model_type": "dinov2", "hidden_size": 384,')
    for source in (folder, folder / "model.safetensors"):
        with pytest.raises(DinokitError, match=r"config\.json is not valid JSON") as e:
            dinokit.load_model(source)
        assert str(config) in str(e.value)
    config.write_text(json.dumps({k: v for k, v in good.items() if k != "hidden_size"}))
    with pytest.raises(DinokitError, match=r"config\.json lacks 'hidden_size'") as e:
        dinokit.load_model(folder)
    assert str(config) in str(e.value)
    config.write_text(json.dumps({**good, "num_hidden_layers": "two"}))
    with pytest.raises(DinokitError, match="num_hidden_layers"):
        dinokit.load_model(folder)


def test_an_official_export_warns_where_reading_it_back_would_guess_otherwise(tmp_path):
    """An official .pth of a shape no named architecture has loaded back with other heads (num_heads=1
    for vit_micro_p4 with registers), with a warning only when it was read, none when it was written."""
    custom = dinokit.create_model("vit_micro_p4", num_register_tokens=4)
    with pytest.warns(UserWarning, match=r"does not store num_heads.*load_model\(path, num_heads=3"):
        dinokit.export_model(custom, tmp_path / "custom.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dinokit.load_model(tmp_path / "custom.pth").config.num_heads != custom.config.num_heads
    kept = dinokit.load_model(dinokit.export_model(custom, tmp_path / "custom.safetensors"))
    assert kept.config.num_heads == custom.config.num_heads
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a named architecture's shape reads back as itself: no warning
        dinokit.export_model(dinokit.create_model("vit_micro_p4"), tmp_path / "named.pth")


def test_a_crash_between_the_hf_files_keeps_the_earlier_export_whole(tmp_path, model, monkeypatch):
    """format=hf wrote model.safetensors and then config.json into the folder itself: an export killed
    between the two left the new weights beside the earlier config. The folder is now replaced whole:
    the earlier export stays as it was, and a finished one keeps the folder's other files."""
    from dinokit.models import loading

    folder = tmp_path / "hf"
    dinokit.export_model(model, folder, format="hf")
    (folder / "README.md").write_text("model card")
    (folder / "pytorch_model.bin").write_bytes(b"stale weights of an earlier export")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = perturb_scales_and_norms(dinokit.create_model("dinov2_vits14_reg", depth=1, img_size=56)).eval()

    def killed(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "write_json", killed)  # the second of the two files
    with pytest.raises(KeyboardInterrupt):
        dinokit.export_model(other, folder, format="hf")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no half-written folder beside it
    monkeypatch.undo()
    dinokit.export_model(other, folder, format="hf")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (folder / "README.md").read_text() == "model card"
    assert same_outputs(other, dinokit.load_model(folder)) and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_an_hf_export_after_one_killed_mid_swap_keeps_the_earlier_folders_other_files(tmp_path, model):
    """An hf export killed between renaming the earlier folder aside and the new one in leaves no folder;
    the next export created an empty one before atomic_folder could put the earlier one back, so the
    earlier folder (its README, ...) was removed instead of carried over. The folder is no longer
    created up front."""

    folder = tmp_path / "hf"
    dinokit.export_model(model, folder, format="hf")
    (folder / "README.md").write_text("model card")
    folder.rename(tmp_path / f".hf.old-{dead_writer_tag()}")  # killed mid-swap
    dinokit.export_model(model, folder, format="hf")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (folder / "README.md").read_text() == "model card" and [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert same_outputs(model, dinokit.load_model(folder))


def test_an_official_export_warns_where_the_layer_norm_eps_would_be_read_back_otherwise(tmp_path):
    """The official layout does not store the LayerNorm eps: a model with eps 1e-12 (transformers' ViTModel
    default, e.g. DINO v1 read from the Hub) came back with 1e-6 from its .pth, silently, with other outputs."""
    m = perturb_scales_and_norms(dinokit.create_model("vit_micro_p4", norm_eps=1e-12)).eval()
    with pytest.warns(UserWarning, match=r"does not store norm_eps.*load_model\(path, norm_eps=1e-12\)"):
        path = dinokit.export_model(m, tmp_path / "m.pth")
    assert same_outputs(m, dinokit.load_model(path, norm_eps=1e-12), size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the official eps: nothing lost, no warning
        dinokit.export_model(dinokit.create_model("vit_micro_p4"), tmp_path / "named.pth")


def test_an_official_export_of_a_dinov2_model_without_a_mask_token_holds_the_official_zero_token(tmp_path):
    """A DINOv2 model without a mask token (transformers' use_mask_token=False, or mask_token=False) was
    written to the official layout without `mask_token`, which the official model always has (strict load)."""
    m = perturb_scales_and_norms(dinokit.create_model("dinov2_vits14_reg", depth=2, img_size=56, mask_token=False))
    sd = torch.load(dinokit.export_model(m.eval(), tmp_path / "m.pth"), weights_only=True)
    official = dinokit.create_model("dinov2_vits14_reg", depth=2, img_size=56).state_dict()
    assert set(sd) == set(official) and torch.equal(sd["mask_token"], torch.zeros(1, 384))
    assert same_outputs(m, dinokit.load_model(tmp_path / "m.pth"))
    v1 = dinokit.export_model(dinokit.create_model("dino_vits16", depth=1), tmp_path / "v1.pth")
    assert "mask_token" not in torch.load(v1, weights_only=True)  # DINO v1 has none


def test_an_mlp_width_that_is_no_whole_multiple_of_the_width_reads_back(tmp_path):
    """dim 224 with mlp_ratio 2.18 has a 488-wide MLP (int(224 * 2.18)); the ratio inferred back, 488 / 224,
    gave int(224 * 488 / 224) = 487, so dinokit's own .pth export did not load ('file (488, 224) vs model
    (487, 224)')."""
    m = VisionTransformer(ViTConfig(img_size=28, patch_size=14, embed_dim=224, depth=1, num_heads=4, mlp_ratio=2.18))
    m = perturb_scales_and_norms(m).eval()
    assert m.blocks[0].mlp.fc1.out_features == 488
    back = dinokit.load_model(dinokit.export_model(m, tmp_path / "m.pth"), num_heads=4)
    assert back.blocks[0].mlp.fc1.out_features == 488
    assert same_outputs(m, back, size=28)


def test_a_guessed_head_count_divides_the_width(tmp_path):
    """Heads are guessed as dim // 64 for a shape no named architecture has; for dim 224 that is 3, which
    does not divide it, and the load died in the model's constructor with a ValueError."""
    m = perturb_scales_and_norms(
        VisionTransformer(ViTConfig(img_size=28, patch_size=14, embed_dim=224, depth=1, num_heads=4))
    )
    path = dinokit.export_model(m.eval(), tmp_path / "m.pth")
    with pytest.warns(UserWarning, match=r"guessed num_heads=4"):
        back = dinokit.load_model(path)
    assert same_outputs(m, back, size=28)


def test_shape_only_models_draw_no_weights_so_loading_does_not_import_the_compiler(tmp_path):
    """load_model builds its model on the meta device; drawing the official init there (normal_ on a
    meta tensor) imported torch._dynamo, 1.4 s of every command that loads a model."""
    import subprocess
    import sys

    path = tmp_path / "nano.safetensors"
    dinokit.export_model(dinokit.create_model("vit_nano_p2"), path)
    code = (
        "import sys, dinokit; from dinokit.models.commands import architecture_table\n"
        f"dinokit.load_model({str(path)!r}); rows = architecture_table()\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n"
        "print({r['name']: r['params'] for r in rows}['dinov2_vitg14_reg'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1136486912"
    with torch.device("meta"):
        meta = VisionTransformer(ViTConfig(img_size=16, patch_size=2, embed_dim=32, depth=1, num_heads=2))
    assert meta.cls_token.is_meta and meta.blocks[0].attn.qkv.weight.is_meta


def test_load_model_says_random_weights_are_for_baselines_only():
    with pytest.raises(DinokitError, match=r"random:vit_micro_p4' \(an untrained network\).*weights are needed"):
        dinokit.load_model("random:vit_micro_p4")
