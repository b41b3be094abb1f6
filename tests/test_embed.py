import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit import runtime
from dinokit.cli import main
from dinokit.data.transforms import eval_transform
from dinokit.errors import DinokitError
from dinokit.eval.backbone import weights_hash
from dinokit.features import embed as embed_module
from dinokit.features.embed import auto_shard_size, embed
from dinokit.features.extract import extract_features
from dinokit.features.store import read_embeddings, read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """13 images of varied sizes (one corrupt) and a tiny model with 2 registers, saved to a file."""
    root = tmp_path_factory.mktemp("embed")
    rng = np.random.default_rng(0)
    folder = root / "images"
    folder.mkdir()
    for i in range(12):
        h, w = rng.integers(20, 60, size=2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "05b.jpg").write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    model = dinokit.create_model("vit_micro_p4", depth=2, num_register_tokens=2)
    weights = dinokit.export_model(model, root / "model.safetensors")
    return folder, weights, model.eval()


def run(setup, out, **kw):
    folder, weights, _ = setup
    args = dict(image_size=16, batch_size=3, num_workers=0, shard_size=4, progress=False, precision="fp32")
    return embed(model=weights, data=str(folder), out=str(out), **{**args, **kw})


def test_shards_hold_the_features_of_extract_features(setup, tmp_path):
    folder, _, model = setup
    kinds = ["cls", "patch_mean", "registers", "patch_tokens", "layers"]
    summary = run(setup, tmp_path / "e", features=kinds, layers=[0, 1], image_size=[16, 24])
    assert summary["images"] == 13 and summary["embedded"] == 12 and summary["bad_files"] == 1
    assert summary["shards"] == 4 and summary["computed_shards"] == 4
    manifest = read_manifest(tmp_path / "e")
    assert manifest["bad_files"] == [str((folder / "05b.jpg").absolute())]
    assert manifest["image_size"] == [16, 24] and manifest["patch_grid"] == [4, 6]
    assert manifest["feature_shapes"]["patch_tokens"] == [4, 6, 96] and manifest["dtype"] == "float32"
    assert "CenterCrop(size=(16, 24))" in manifest["transform"] and manifest["model"].endswith("model.safetensors")
    feats, paths = read_embeddings(tmp_path / "e")
    every = sorted(folder.iterdir())
    good = [p for p in every if p.name != "05b.jpg"]
    assert paths == [str(p.absolute()) for p in good]
    ref, kept, bad = extract_features(
        model, every, eval_transform((16, 24)), which=kinds, layers=[0, 1], num_workers=0, precision="fp32"
    )
    assert len(kept) == 12 and [every[i].name for i in bad] == ["05b.jpg"]
    assert feats["patch_tokens"].shape == (12, 4, 6, 96) and feats["registers"].shape == (12, 2, 96)
    for k in kinds:
        assert torch.allclose(feats[k].flatten(1), ref[k].flatten(1), atol=1e-5), k


def test_layer_patch_tokens_are_the_intermediate_layers_on_the_patch_grid(setup, tmp_path):
    _, _, model = setup
    layers = [0, -1]
    run(setup, tmp_path / "e", features=["layer_patch_tokens", "cls"], layers=layers, image_size=[16, 24])
    manifest = read_manifest(tmp_path / "e")
    assert manifest["feature_shapes"]["layer_patch_tokens"] == [2, 4, 6, 96]
    assert manifest["weights_hash"] == weights_hash(model)
    feats, paths = read_embeddings(tmp_path / "e")
    assert feats["layer_patch_tokens"].shape == (12, 2, 4, 6, 96)
    transform = eval_transform((16, 24))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[:4]])
    with torch.inference_mode():
        grids = model.get_intermediate_layers(x, n=layers, reshape=True, norm=True)  # each (B, D, h, w)
    expected = torch.stack([g.permute(0, 2, 3, 1) for g in grids], dim=1)
    assert torch.allclose(feats["layer_patch_tokens"][:4], expected, atol=1e-5)


def test_numpy_float16_shards(setup, tmp_path):
    run(setup, tmp_path / "f32", features=["cls"])
    run(setup, tmp_path / "npz", features=["cls"], format="numpy", dtype="float16")
    assert sorted(p.name for p in (tmp_path / "npz").glob("shard_*")) == [f"shard_0000{i}.npz" for i in range(4)]
    a, paths_a = read_embeddings(tmp_path / "f32")
    b, paths_b = read_embeddings(tmp_path / "npz")
    assert paths_a == paths_b and b["cls"].dtype == torch.float16
    assert torch.allclose(a["cls"], b["cls"].float(), atol=2e-3)


def test_killed_job_resumes_without_recomputing_finished_shards(setup, tmp_path, monkeypatch):
    reference = tmp_path / "ref"
    run(setup, reference, features=["cls", "patch_mean"])
    out = tmp_path / "run"
    real_write = embed_module.write_shard
    written = []

    def crash_on_third(path, *args):
        if len(written) == 2:  # the third shard dies half-way through its write
            Path(path).with_name(f".{Path(path).name}.tmp99").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_write(path, *args)
        written.append(Path(path).name)

    monkeypatch.setattr(embed_module, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(setup, out, features=["cls", "patch_mean"])
    assert (
        sorted(p.name for p in out.glob("shard_*")) == written == ["shard_00000.safetensors", "shard_00001.safetensors"]
    )
    assert not (out / "manifest.json").exists()
    with pytest.raises(DinokitError, match="has not finished"):
        read_embeddings(out)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}

    monkeypatch.setattr(embed_module, "write_shard", real_write)
    images_seen = []
    real_iter = embed_module.iter_features
    monkeypatch.setattr(
        embed_module,
        "iter_features",
        lambda m, paths, *a, **k: images_seen.extend(paths) or real_iter(m, paths, *a, **k),
    )
    summary = run(setup, out, features=["cls", "patch_mean"])
    assert summary["computed_shards"] == 2 and summary["resumed_shards"] == 2
    assert len(images_seen) == 13 - 8  # only the two unfinished shards were computed
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_0000[01]*")} == finished
    assert not list(out.glob(".*tmp*"))  # the half-written temporary file was cleaned up
    a, paths_a = read_embeddings(out)
    b, paths_b = read_embeddings(reference)
    assert paths_a == paths_b and all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("format", ["safetensors", "numpy"])
def test_a_damaged_shard_is_computed_again_and_named_when_read(setup, tmp_path, capsys, format):
    """A shard cut short outside dinokit (an interrupted copy of the folder) ended a rerun, and index
    build, in the reader's traceback."""
    out = tmp_path / "e"
    run(setup, out, format=format)
    reference, paths = read_embeddings(out)
    shard = next(out.glob("shard_00001.*"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DinokitError, match=f"{shard.name} is damaged"):
        read_embeddings(out)
    assert run(setup, out, format=format)["computed_shards"] == 1
    assert f"{shard.name} is damaged; computing it again" in capsys.readouterr().err
    again, again_paths = read_embeddings(out)
    assert again_paths == paths and all(torch.equal(again[k], reference[k]) for k in reference)


def test_resuming_with_other_settings_is_refused(setup, tmp_path):
    run(setup, tmp_path / "e")
    with pytest.raises(DinokitError, match=r"other settings \(image_size"):
        run(setup, tmp_path / "e", image_size=24)


def test_manifest_records_fp32_where_bf16_falls_back_to_it(setup, tmp_path, monkeypatch):
    """On a device without bf16 autocast (MPS, older GPUs; simulated here) precision=bf16 runs in
    fp32, and the manifest, which index search reuses for queries, says so."""
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
    monkeypatch.setattr(runtime, "_warned_fp32", set())
    with pytest.warns(UserWarning, match="running in fp32"):
        run(setup, tmp_path / "asked_bf16", precision="bf16")
    run(setup, tmp_path / "fp32", precision="fp32")
    assert read_manifest(tmp_path / "asked_bf16")["precision"] == "fp32"
    fallback, exact = read_embeddings(tmp_path / "asked_bf16")[0], read_embeddings(tmp_path / "fp32")[0]
    assert torch.equal(fallback["cls"], exact["cls"])  # what ran was fp32
    monkeypatch.undo()
    run(setup, tmp_path / "bf16", precision="bf16")  # the CPU has bf16 autocast
    assert read_manifest(tmp_path / "bf16")["precision"] == "bf16"
    assert not torch.equal(read_embeddings(tmp_path / "bf16")[0]["cls"], exact["cls"])


def test_bad_requests(setup, tmp_path):
    with pytest.raises(DinokitError, match="multiple of the patch size 4; use 28 or 32"):
        run(setup, tmp_path / "a", image_size=30)
    with pytest.raises(DinokitError, match="numpy has no bfloat16"):
        run(setup, tmp_path / "b", format="numpy", dtype="bfloat16")
    with pytest.raises(DinokitError, match="layers="):
        run(setup, tmp_path / "c", features=["layers"])
    with pytest.raises(DinokitError, match=r"\['layer_patch_tokens'\] need the block indices"):
        run(setup, tmp_path / "c", features=["cls", "layer_patch_tokens"])
    with pytest.raises(DinokitError, match="one shape per batch"):
        run(setup, tmp_path / "d", resize_policy="aspect")
    for key, value in (("batch_size", 0), ("num_workers", -1), ("shard_size", -5)):  # tracebacks; -5: no shards
        with pytest.raises(DinokitError, match=f"{key} must be"):
            run(setup, tmp_path / "e", **{key: value})
    assert not (tmp_path / "e").exists()


def test_data_without_one_readable_image_is_an_error_before_any_work(setup, tmp_path):
    _, weights, _ = setup
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("not an image")
    (tmp_path / "bad" / "b.jpg").write_bytes(b"")
    with pytest.raises(DinokitError, match=r"none of the 2 images .* could be read.*a\.png: not an image format"):
        embed(model=weights, data=str(tmp_path / "bad"), out=str(tmp_path / "out"), image_size=16, progress=False)
    assert not (tmp_path / "out").exists()  # was a finished run with 0 images embedded


def test_torchrun_two_processes_write_their_shards_and_one_manifest(setup, tmp_path):
    folder, weights, _ = setup
    single = tmp_path / "single"
    run(setup, single, features=["cls", "patch_tokens"], precision="bf16", device="cpu")  # as the gloo processes
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "dinokit", "embed", f"model={weights}", f"data={folder}", f"out={out}", "image_size=16"]
    cmd += [
        "batch_size=3",
        "num_workers=0",
        "shard_size=4",
        "progress=false",
        "features=[cls,patch_tokens]",
        "device=cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])  # printed once, by process 0
    assert summary["processes"] == 2 and summary["computed_shards"] == 4 and summary["embedded"] == 12
    assert sorted(p.name for p in out.iterdir()) == [".dinokit.lock", "embed_config.json", "manifest.json"] + [
        f"shard_0000{i}.safetensors" for i in range(4)
    ]
    a, paths_a = read_embeddings(out)
    b, paths_b = read_embeddings(single)
    assert paths_a == paths_b
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)


def test_torchrun_an_error_of_every_process_after_they_join_is_printed_once(setup, tmp_path):
    """data= a folder without images under torchrun: every process printed "no images found"."""
    _, weights, _ = setup
    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dinokit"]
    cmd += ["embed", f"model={weights}", f"data={tmp_path / 'empty'}", f"out={tmp_path / 'out'}", "device=cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("dinokit: error:") == 1, result.stderr[-3000:]
    assert f"dinokit: error: no images found under {tmp_path / 'empty'}" in result.stderr


def test_default_shard_size_keeps_shards_near_512_mb():
    assert auto_shard_size({"cls": [384]}, "float32") == 4096
    assert auto_shard_size({"cls": [384], "patch_tokens": [32, 32, 384]}, "float32") == 2**29 // ((1024 + 1) * 384 * 4)
    assert auto_shard_size({"patch_tokens": [16, 16, 1536]}, "float16") == 682


# Process 0 cannot write the settings file of a new out= folder (a full disk), after the processes joined.
CONFIG_WRITE_FAILS_ON_PROCESS_0 = """
import errno, os, sys
from dinokit.cli import main
from dinokit.features import embed
def write_json(path, obj):
    if os.environ["RANK"] == "0":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
embed.write_json = write_json
sys.exit(main(["embed", *sys.argv[1:]]))
"""


def test_torchrun_process_0_failing_to_write_the_settings_stops_the_others_without_a_traceback(setup, tmp_path):
    """Process 0 wrote embed_config.json alone, outside compare_errors, while the others waited in a
    barrier: its error ended the job, and the others died in that barrier with gloo's traceback."""
    folder, weights, _ = setup
    (tmp_path / "run.py").write_text(CONFIG_WRITE_FAILS_ON_PROCESS_0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(tmp_path / "run.py"), f"model={weights}", f"data={folder}", f"out={tmp_path / 'out'}"]
    cmd += ["image_size=16", "num_workers=0", "progress=false", "device=cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("dinokit: error:") == 1, result.stderr[-3000:]
    assert f"dinokit: error: No space left on device ({tmp_path / 'out' / 'embed_config.json'})" in result.stderr
    assert "[rank1]: Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_damaged_settings_file_or_manifest_is_an_error_naming_it_and_the_fix(setup, tmp_path):
    """embed_config.json and manifest.json were read with json.loads: a damaged one (a copy cut short)
    ended in a bare JSONDecodeError traceback."""
    out = tmp_path / "e"
    run(setup, out)
    (out / "manifest.json").write_text('{"model": "m.safe')
    with pytest.raises(DinokitError, match=r"manifest\.json is not valid JSON.*run the same `dinokit embed` again"):
        read_manifest(out)
    (out / "manifest.json").unlink()  # the fix it names: finished shards are kept, the manifest rewritten
    assert run(setup, out)["computed_shards"] == 0 and read_manifest(out)["num_embedded"] == 12
    (out / "embed_config.json").write_text("{")
    with pytest.raises(DinokitError, match=r"embed_config\.json is not valid JSON.*new out= folder"):
        run(setup, out)


def test_reading_a_missing_path_or_a_file_as_an_embedding_says_so_not_that_the_run_is_unfinished(tmp_path):
    """A typo in features= was answered 'the run has not finished: run the same dinokit embed again'."""
    with pytest.raises(DinokitError, match="is not there: pass the folder that `dinokit embed"):
        read_manifest(tmp_path / "no_such_run")
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(DinokitError, match=r"list\.txt is a file: pass the folder"):
        read_manifest(tmp_path / "list.txt")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(DinokitError, match="the run has not finished"):
        read_manifest(tmp_path / "unfinished")


@pytest.mark.parametrize(
    "changed, named",
    [
        ({"features": ["cls", "patch_mean"]}, "feature_shapes, features"),
        ({"resize_policy": "resize"}, "resize_policy, transform"),
        ({"precision": "bf16"}, "precision"),
        ({"dtype": "float16"}, "dtype"),
        ({"image_size": [16, 20]}, "image_size, patch_grid, transform"),
    ],
)
def test_resuming_with_any_other_setting_is_refused_naming_it(setup, tmp_path, changed, named):
    """Finished shards are never mixed with shards of other settings: embed_config.json, written before
    the first shard, must match (whatever the order of the changes, every one is named)."""
    run(setup, tmp_path / "e")
    with pytest.raises(DinokitError, match=rf"other settings \({named} differ"):
        run(setup, tmp_path / "e", **changed)


def test_resuming_with_another_model_is_refused(setup, tmp_path):
    """Another weights file, or the same file with other weights (its hash), is another model."""
    folder = setup[0]
    run(setup, tmp_path / "e")
    torch.manual_seed(1)  # not the set-up's seed: other weights whatever embed drew from the global stream
    other = dinokit.export_model(
        dinokit.create_model("vit_micro_p4", depth=2, num_register_tokens=2), tmp_path / "o.safetensors"
    )
    with pytest.raises(DinokitError, match=r"other settings \(model, weights_hash differ"):
        embed(
            model=other,
            data=str(folder),
            out=str(tmp_path / "e"),
            image_size=16,
            batch_size=3,
            num_workers=0,
            shard_size=4,
            progress=False,
            precision="fp32",
        )


def test_shards_without_their_settings_file_are_not_resumed(setup, tmp_path):
    """Shards whose embed_config.json is gone (removed, or not copied with them) have unknown settings:
    a run at another image_size wrote a new settings file and kept them as finished, so the embedding
    mixed 16 px and 24 px features."""
    run(setup, tmp_path / "e")
    (tmp_path / "e" / "embed_config.json").unlink()
    (tmp_path / "e" / "manifest.json").unlink()
    with pytest.raises(DinokitError, match=r"holds 4 shard\(s\) \(shard_00000.safetensors, ...\) but no embed_config"):
        run(setup, tmp_path / "e", image_size=24)


def test_reduced_decode_is_a_setting_and_a_folder_embedded_whole_resumes_with_it(setup, tmp_path):
    """reduced_decode=false embeds as the official transform (no ReducedJpegDecode); such a folder (or
    one embedded before dinokit decoded large JPEGs at a reduced scale) refuses a resume with the default,
    naming reduced_decode=false, which resumes it."""
    run(setup, tmp_path / "e", reduced_decode=False)
    assert "ReducedJpegDecode" not in read_manifest(tmp_path / "e")["transform"]
    with pytest.raises(DinokitError, match=r"transform differ.*reduced_decode=false"):
        run(setup, tmp_path / "e")
    run(setup, tmp_path / "e", reduced_decode=False)
    run(setup, tmp_path / "f")
    assert "ReducedJpegDecode(min_side=" in read_manifest(tmp_path / "f")["transform"]


def test_a_file_name_that_is_not_utf8_is_embedded(setup, tmp_path):
    """A file name of bytes that are not UTF-8 (os.listdir gives it surrogate escapes) crashed embed with
    a UnicodeEncodeError while hashing the file list, before any work."""
    import os
    import shutil

    folder, weights, _ = setup
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(folder / "00.png", os.path.join(os.fsencode(images), b"caf\xe9.png"))
    shutil.copy(folder / "01.png", images / "plain.png")
    embed(model=weights, data=str(images), out=str(tmp_path / "e"), image_size=16, num_workers=0, progress=False)
    feats, paths = read_embeddings(tmp_path / "e")
    assert feats["cls"].shape[0] == 2 and os.fsencode(paths[0]).endswith(b"caf\xe9.png")


def test_dinokit_embed_on_a_device_short_of_memory_writes_the_shards_of_a_plain_run(setup, tmp_path, memory_fits):
    """The device fits 3 images of batch_size=4: embed goes on 2 at a time, with one warning, and writes
    what a plain run writes (features, order, bad files, shards)."""
    folder, weights, _ = setup
    keys = [f"model={weights}", f"data={folder}", "image_size=16", "batch_size=4", "num_workers=0", "shard_size=5"]
    keys += ["precision=fp32", "features=[cls,patch_tokens]", "progress=false"]
    assert main(["embed", *keys, f"out={tmp_path / 'plain'}"]) == 0
    tried = memory_fits(3)
    with pytest.warns(UserWarning) as warned:
        assert main(["embed", *keys, f"out={tmp_path / 'short'}"]) == 0
    assert [str(w.message) for w in warned] == [
        "out of memory on cpu at batch_size=4: the features are computed 2 images at a time from here on "
        "(pass batch_size=2 next time)"
    ]
    assert tried == [4, 2, 2, 2, 1, 2, 2, 1]  # batches of 4 paths: 4, 3 (and a bad file), 4, 1 images
    plain, short = read_manifest(tmp_path / "plain"), read_manifest(tmp_path / "short")
    assert short["bad_files"] == plain["bad_files"] and short["shards"] == plain["shards"]
    (plain_feats, plain_paths), (feats, paths) = (
        read_embeddings(tmp_path / "plain"),
        read_embeddings(tmp_path / "short"),
    )
    assert paths == plain_paths
    for kind in plain_feats:
        torch.testing.assert_close(feats[kind], plain_feats[kind])
