"""Security and data safety: what dinokit may remove or overwrite in a folder it is given, paths it
reads back, files it refuses to unpickle. Each test is a defect that was found and fixed."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pretrain_helpers import run, tiny_images

from dinokit.cli import main
from dinokit.data.synthetic import write_dense_set
from dinokit.errors import DinokitError

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


def small_video(root: Path) -> list[str]:
    """root/frames/f0..f3.png (noise) and root/truth/f0..f3.png (class-index masks); the frame names."""
    rng = np.random.default_rng(0)
    (root / "frames").mkdir(parents=True)
    (root / "truth").mkdir()
    names = [f"f{t}" for t in range(4)]
    for t, name in enumerate(names):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "frames" / f"{name}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[t * 4 : t * 4 + 12, 4:16] = 1
        Image.fromarray(mask).save(root / "truth" / f"{name}.png")
    return names


def test_track_never_writes_its_masks_over_the_ground_truth_or_the_first_mask(tmp_path, capsys):
    """`dinokit track ground_truth=T out=T` wrote each predicted mask over T/<frame>.png, then scored it
    against itself: the ground truth lost, J&F reported as 1.0. An out= where a mask or overlay would
    replace a frame, the first mask or a ground-truth mask is now refused before any work."""
    small_video(tmp_path)
    truth = {p.name: p.read_bytes() for p in (tmp_path / "truth").iterdir()}
    args = ["track", "model=random:vit_nano_p2", f"frames={tmp_path / 'frames'}", "image_size=32", "device=cpu"]
    cases = ((tmp_path / "truth", tmp_path / "truth" / "f0.png"), (tmp_path / "m", tmp_path / "m" / "f0.png"))
    for out, first in cases:
        first.parent.mkdir(exist_ok=True)
        first.write_bytes(truth["f0.png"])
        assert main([*args, f"first_mask={first}", f"ground_truth={tmp_path / 'truth'}", f"out={out}"]) == 2
        assert "would overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "truth").iterdir()} == truth
    assert not (tmp_path / "truth" / "track.json").exists()
    assert (tmp_path / "m" / "f0.png").read_bytes() == truth["f0.png"]
    assert main([*args, f"first_mask={first}", f"ground_truth={tmp_path / 'truth'}", f"out={tmp_path / 'o'}"]) == 0


def test_eval_video_never_writes_its_masks_over_the_annotations(tmp_path, capsys):
    """`dinokit eval video out=DAVIS/Annotations/480p` wrote each sequence's masks over its annotations
    and scored them against themselves (J&F 1.0, the annotations lost); refused now before any work."""
    names = small_video(tmp_path / "v")
    root = tmp_path / "DAVIS"
    for kind, folder, suffix in (("JPEGImages", "frames", ".jpg"), ("Annotations", "truth", ".png")):
        (root / kind / "480p" / "seq").mkdir(parents=True)
        for name in names:
            Image.open(tmp_path / "v" / folder / f"{name}.png").save(root / kind / "480p" / "seq" / f"{name}{suffix}")
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("seq\n")
    annotations = root / "Annotations" / "480p"
    before = {p.name: p.read_bytes() for p in (annotations / "seq").iterdir()}
    args = ["eval", "video", "model=random:vit_nano_p2", f"data={root}", "image_size=32", "device=cpu"]
    args += ["num_workers=0", "preprocessing=dinokit"]
    assert main([*args, f"out={annotations}"]) == 2
    assert "would overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (annotations / "seq").iterdir()} == before
    assert not (annotations / "video.json").exists()
    assert main([*args, f"out={tmp_path / 'out'}"]) == 0


def test_segment_never_writes_over_its_reference_mask(tmp_path, capsys):
    """`dinokit segment reference=photos/a.png reference_mask=photos/a_mask.png target=photos/a.png
    out=photos` wrote a's predicted mask over photos/a_mask.png, the reference mask it was given (masks
    kept beside their images as <name>_mask.png, a common layout). Refused now before any work."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(photos / "a.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    Image.fromarray(mask).save(photos / "a_mask.png")
    before = (photos / "a_mask.png").read_bytes()
    args = ["segment", "model=random:vit_nano_p2", f"reference={photos / 'a.png'}", "image_size=32", "device=cpu"]
    args += [f"reference_mask={photos / 'a_mask.png'}", f"target={photos / 'a.png'}"]
    assert main([*args, f"out={photos}"]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert (photos / "a_mask.png").read_bytes() == before and not (photos / "a_overlay.png").exists()
    assert main([*args, f"out={tmp_path / 'out'}"]) == 0


@pytest.mark.parametrize("resume", [False, True])
def test_a_new_pretraining_run_never_replaces_files_it_did_not_write(resume, tmp_path):
    """`dinokit pretrain out=F` into a folder of the user's own files (no config.yaml) rewrote F/metrics.jsonl
    (rows after iteration 0 dropped), replaced F/backbone.safetensors and deleted all but the newest
    keep_checkpoints F/checkpoints/checkpoint_*.pt; resume=true did the same where F held no run yet.
    Such a folder is now refused before any work, untouched."""
    data = tiny_images(tmp_path / "data")
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    mine = {
        "metrics.jsonl": '{"iteration": 5, "loss": 1.0}\n',
        "backbone.safetensors": "my weights",
        "checkpoints/checkpoint_00000001.pt": "my checkpoint",
    }
    for name, text in mine.items():
        (out / name).write_text(text)
    with pytest.raises(DinokitError, match=r"metrics\.jsonl") as refused:
        run(data, out, max_iterations=2, checkpoint_every=1, keep_checkpoints=1, resume=resume)
    assert "choose" in str(refused.value) and "config.yaml" in str(refused.value)
    assert {name: (out / name).read_text() for name in mine} == mine
    assert not (out / "config.yaml").exists()


def test_a_download_cut_short_is_not_cached_as_the_released_weights(tmp_path, monkeypatch):
    """A connection closed before the whole file arrived raises nothing in urllib (http.client reads
    the short body as complete), and torch.hub.download_url_to_file moved it into the cache as the
    released weights: every later load failed on the cached half file. A torch archive that ends short
    is now refused with a clear error, and not cached: the next call downloads again."""
    import torch

    import dinokit
    from dinokit.models.hub import cache_dir

    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))
    torch.save({"w": torch.arange(4096.0)}, tmp_path / "served.pth")
    served = (tmp_path / "served.pth").read_bytes()
    calls = []

    def cut_short(url, dst, progress=True):
        calls.append(url)
        Path(dst).write_bytes(served[: len(served) // 2])

    monkeypatch.setattr("torch.hub.download_url_to_file", cut_short)
    with pytest.raises(DinokitError, match="stopped short") as refused:
        dinokit.load_model("dinov2_vits14")
    assert "again" in str(refused.value)
    assert not list(cache_dir().iterdir())  # nothing left as if complete, no temporary file either
    with pytest.raises(DinokitError, match="stopped short"):
        dinokit.load_model("dinov2_vits14")
    assert len(calls) == 2  # downloaded again, not read from the cache


def test_a_full_disk_while_downloading_is_not_reported_as_offline(tmp_path, monkeypatch, capsys):
    """A download that filled the disk was reported as "Could not download ... This machine may be
    offline", sending the user after the network. The disk-full OSError now reaches the CLI, which
    names the file and says to free space; nothing is left in the cache."""
    import errno

    from dinokit.models.hub import cache_dir

    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))

    def disk_full(url, dst, progress=True):
        Path(dst).write_bytes(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, "No space left on device", dst)

    monkeypatch.setattr("torch.hub.download_url_to_file", disk_full)
    assert main(["info", "model=dinov2_vits14"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free some space" in err and "offline" not in err
    assert not list(cache_dir().iterdir())


def test_an_index_refuses_image_paths_its_file_list_cannot_hold(tmp_path):
    """An image whose name holds a line break (legal on Linux and macOS) was written into the index's
    paths-<g>.txt (one path a line) as two lines: the index then never loaded again ("index (3) and file
    list (4) disagree; rebuild it", and a rebuild wrote the same). Saving it is now refused, naming the
    file and the fix, before any file of the index is written."""
    from dinokit.retrieval.index import FeatureIndex

    vectors = np.eye(3, 4, dtype=np.float32)
    index = FeatureIndex.create(vectors, ["/data/a.png", "/data/b\nc.png", "/data/d.png"], {})
    with pytest.raises(DinokitError, match="line break") as refused:
        index.save(tmp_path / "index")
    assert "b\\nc.png" in str(refused.value) and "rename" in str(refused.value)
    assert not (tmp_path / "index").exists() or not list((tmp_path / "index").iterdir())


def test_curation_refuses_image_paths_its_lists_cannot_hold(tmp_path, capsys):
    """`dinokit curate` wrote an image whose name holds a line break into kept.txt / paths.txt /
    selected.txt (one path a line) as two lines: read back (pretrain data=, embed data=, curate sample)
    it named two files that do not exist, and lost the image. It is now refused before any work,
    naming the file and the fix."""
    import torch

    import dinokit

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b\nc.png", "d.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
    torch.manual_seed(0)
    model = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "m.safetensors")
    embed = ["embed", f"model={model}", f"data={tmp_path / 'images'}", f"out={tmp_path / 'emb'}", "image_size=16"]
    assert main([*embed, "num_workers=0", "device=cpu", "progress=false"]) == 0
    for step in (["dedup"], ["cluster", "n_clusters=2"]):
        out = tmp_path / step[0]
        assert main(["curate", *step, f"features={tmp_path / 'emb'}", f"out={out}", "device=cpu"]) == 2
        err = capsys.readouterr().err
        assert "b\\nc.png" in err and "line break" in err and "rename" in err
        assert not out.exists()


def test_embed_never_replaces_a_manifest_it_did_not_write(tmp_path, capsys):
    """`dinokit embed data=D out=D` (or out= any folder of the user's) replaced D/manifest.json, a common
    name for a dataset's own file list, with the embedding's manifest at the end of the run. A folder
    that holds a manifest.json but no embed_config.json (no embedding started there) is now refused
    before any work, untouched."""
    import torch

    import dinokit

    rng = np.random.default_rng(0)
    data = tmp_path / "dataset"
    data.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / name)
    (data / "manifest.json").write_text('{"source": "my dataset"}\n')
    torch.manual_seed(0)
    model = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "m.safetensors")
    args = ["embed", f"model={model}", f"data={data}", "image_size=16", "num_workers=0", "device=cpu", "progress=false"]
    assert main([*args, f"out={data}"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert (data / "manifest.json").read_text() == '{"source": "my dataset"}\n'
    assert sorted(p.name for p in data.iterdir() if p.name != ".dinokit.lock") == ["a.png", "b.png", "manifest.json"]
    assert main([*args, f"out={tmp_path / 'emb'}"]) == 0 and main([*args, f"out={tmp_path / 'emb'}"]) == 0


def test_index_search_never_writes_its_sheet_or_hits_over_a_query_image(tmp_path, capsys):
    """`dinokit index search query=q.png sheet=q.png` (or out=q.png) wrote the contact sheet over the
    query photo, as the visualize commands refuse to. Now refused before any work."""
    import torch

    import dinokit

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
    torch.manual_seed(0)
    model = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "m.safetensors")
    emb, index = tmp_path / "emb", tmp_path / "index"
    embed = ["embed", f"model={model}", f"data={tmp_path / 'images'}", f"out={emb}", "image_size=16"]
    assert main([*embed, "num_workers=0", "device=cpu", "progress=false"]) == 0
    assert main(["index", "build", f"features={emb}", f"out={index}"]) == 0
    query = tmp_path / "images" / "a.png"
    before = query.read_bytes()
    search = ["index", "search", f"index={index}", f"query={query}", "k=2", "device=cpu"]
    for key in ("sheet", "out"):
        assert main([*search, f"{key}={query}"]) == 2
        assert "input images" in capsys.readouterr().err
        assert query.read_bytes() == before
    assert main([*search, f"sheet={tmp_path / 'hits.png'}"]) == 0


def test_predict_classification_never_writes_over_its_list_of_images(tmp_path, capsys):
    """`dinokit predict classification images=test.csv out=test.csv` wrote the predictions over the
    list of images it read (a path,label CSV, the same suffix as the predictions'). Now refused before
    any work (here before the head is even looked for)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    listing = tmp_path / "test.csv"
    listing.write_text("path,label\na.png,cat\n")
    args = ["predict", "classification", f"head={tmp_path / 'no_head.safetensors'}", f"images={listing}"]
    assert main([*args, f"out={listing}"]) == 2
    err = capsys.readouterr().err
    assert "images=" in err and "would replace it" in err
    assert listing.read_text() == "path,label\na.png,cat\n"


def test_the_demo_never_replaces_files_it_did_not_write(tmp_path, monkeypatch):
    """`dinokit demo out=.` in a project folder replaced its report.md and loss.png (and any
    train_images.txt, knn_train.csv, knn_val.csv) with the demo's. A folder holding files of those
    names but no run/ folder of a demo is now refused before any work, untouched."""
    from dinokit import demo as demo_module

    def no_training(**keys):
        raise RuntimeError("the demo went on to train")

    monkeypatch.setattr(demo_module, "pretrain", no_training)
    data = tiny_images(tmp_path / "data")
    out = tmp_path / "project"
    out.mkdir()
    (out / "report.md").write_text("# my report\n")
    with pytest.raises(DinokitError, match=r"report\.md") as refused:
        demo_module.demo(out=str(out), data=str(data))
    assert "choose" in str(refused.value)
    assert (out / "report.md").read_text() == "# my report\n"
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]


def test_eval_video_never_writes_outside_out_for_a_crafted_sequence_name(tmp_path, capsys):
    """The sequence names of DAVIS's ImageSets/2017/<split>.txt became folders under out= as they were:
    a list naming `../escape` (with JPEGImages/escape and Annotations/escape beside the resolution
    folders) made eval video write its masks to out/../escape/, outside out. A name that is not a
    plain folder name is now refused before any work."""
    names = small_video(tmp_path / "v")
    root = tmp_path / "DAVIS"
    for kind, folder, suffix in (("JPEGImages", "frames", ".jpg"), ("Annotations", "truth", ".png")):
        (root / kind / "480p").mkdir(parents=True)
        (root / kind / "escape").mkdir()
        for name in names:
            Image.open(tmp_path / "v" / folder / f"{name}.png").save(root / kind / "escape" / f"{name}{suffix}")
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("../escape\n")
    out = tmp_path / "runs" / "out"
    args = ["eval", "video", "model=random:vit_nano_p2", f"data={root}", "image_size=32", "device=cpu"]
    assert main([*args, "num_workers=0", "preprocessing=dinokit", f"out={out}"]) == 2
    assert "../escape" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "escape").exists()


@pytest.mark.parametrize("fmt", ["official", "hf"])
def test_export_never_replaces_the_file_it_reads(fmt, tmp_path, capsys):
    """`dinokit export model=ckpt.pth out=ckpt.pth` replaced a whole training checkpoint (teacher,
    optimiser state, epoch) with the backbone alone; format=hf with out= the folder holding model= replaced
    that folder and dropped the file. An export whose output is (or holds) its model= is now refused
    before any work."""
    import torch

    import dinokit

    net = dinokit.create_model("vit_nano_p2")
    folder = tmp_path / "run"
    folder.mkdir()
    checkpoint = folder / "ckpt.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in net.state_dict().items()}, "epoch": 5}, checkpoint)
    before = checkpoint.read_bytes()
    out = checkpoint if fmt == "official" else folder
    assert main(["export", f"model={checkpoint}", f"out={out}", f"format={fmt}"]) == 2
    assert "model=" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["ckpt.pth"]
    assert main(["export", f"model={checkpoint}", f"out={tmp_path / 'elsewhere.pth'}"]) == 0


def test_checkpoint_rotation_removes_only_the_checkpoints_it_wrote(tmp_path):
    """A run's checkpoint rotation took every file whose name ends in checkpoint_<n>.pt as one of its
    own: a copy kept as checkpoints/best_checkpoint_00000002.pt was deleted as an old checkpoint (or
    resumed from as the newest). Only checkpoint_<n>.pt itself is the run's now."""
    from dinokit.train.checkpoint import list_checkpoints, save_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "best_checkpoint_00000002.pt").write_text("my copy")
    (folder / "checkpoint_00000009.pt.bak").write_text("my backup")
    for iteration in (1, 3, 4):
        save_checkpoint(folder, iteration, {"iteration": iteration}, keep=2)
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint_00000003.pt", "checkpoint_00000004.pt"]
    assert (folder / "best_checkpoint_00000002.pt").read_text() == "my copy"
    assert (folder / "checkpoint_00000009.pt.bak").read_text() == "my backup"


def test_a_released_classifier_head_that_needs_pickle_is_refused_with_the_fix(tmp_path, capsys):
    """A .pth given as a released ImageNet linear head that pickles more than tensors was refused with
    torch's own message passed on, whose first remedy is to load it with weights_only=False (run its
    pickled code). It now gets dinokit's refusal, as weights files and the segmentation / depth heads
    do: which file, that dinokit never unpickles code, and how to keep its tensors alone."""
    import datetime

    import torch

    head = tmp_path / "dinov2_vits14_linear_head.pth"
    torch.save({"weight": torch.zeros(1000, 768), "bias": torch.zeros(1000), "when": datetime.date(2024, 1, 1)}, head)
    args = ["predict", "classification", f"head={head}", f"images={tmp_path}", "model=random:vit_nano_p2"]
    assert main([*args, f"out={tmp_path / 'p.csv'}"]) == 2
    err = capsys.readouterr().err
    assert str(head) in err and "never unpickles" in err and "weights_only=False" not in err


def test_reading_another_runs_damaged_checkpoint_never_says_to_delete_it(tmp_path):
    """continue_from= / distill_from= a run whose checkpoint could not be read was told "delete it to
    resume from the previous one": advice for resuming one's own run, here to delete a checkpoint of
    the run read from (maybe its only one). The error now says to pass another checkpoint of that run;
    a checkpoint that pickles objects gets dinokit's refusal, not torch's weights_only=False remedy."""
    import datetime

    import torch

    from dinokit.train.checkpoint import read_run

    run = tmp_path / "other_run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "checkpoint_00000004.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(DinokitError) as damaged:
        read_run(tmp_path / "other_run", "continue_from")
    assert "delete" not in str(damaged.value) and "another checkpoint" in str(damaged.value)
    torch.save({"config": {}, "model": {}, "when": datetime.date(2024, 1, 1)}, run / "checkpoint_00000004.pt")
    with pytest.raises(DinokitError) as pickled:
        read_run(run / "checkpoint_00000004.pt", "distill_from")
    assert "never unpickles" in str(pickled.value) and "weights_only=False" not in str(pickled.value)


def test_embed_errors_never_advise_removing_a_folder_of_images(tmp_path, capsys):
    """With out= the images folder itself (which embed allows), a damaged embed_config.json was met with
    "remove <out> and embed again", and shards without one with "or remove the folder": the user's images
    with it. The errors now name the embedding's own files to remove."""
    import torch

    import dinokit

    rng = np.random.default_rng(0)
    data = tmp_path / "photos"
    data.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / name)
    torch.manual_seed(0)
    model = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "m.safetensors")
    args = ["embed", f"model={model}", f"data={data}", f"out={data}", "image_size=16", "num_workers=0", "device=cpu"]
    assert main([*args, "progress=false"]) == 0
    (data / "embed_config.json").write_text("{ cut short")
    assert main([*args, "progress=false"]) == 2
    err = capsys.readouterr().err
    assert f"remove {data} " not in err and "embed_config.json" in err
    (data / "embed_config.json").unlink()
    (data / "manifest.json").unlink()
    assert main([*args, "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "remove the folder" not in err and "shard_*" in err


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_predict_never_writes_over_files_it_did_not_write(task, tmp_path, capsys):
    """`dinokit predict segmentation images=dataset/images out=dataset/masks` wrote each prediction over
    the ground-truth mask of the same name (images/x.png and masks/x.png: the layout eval segmentation
    reads), files no predict run had written. A file this run would write that is in out= but not in the
    earlier run's record (.dinokit-predictions.json) is now refused before any prediction, untouched."""
    from test_eval_dense import save_tiny_head

    save_tiny_head(task, tmp_path / "head.safetensors")
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
        Image.fromarray(np.ones((20, 30), np.uint8)).save(tmp_path / "masks" / name)
    truth = {p.name: p.read_bytes() for p in (tmp_path / "masks").iterdir()}
    args = ["predict", task, f"head={tmp_path / 'head.safetensors'}", f"images={tmp_path / 'images'}"]
    assert main([*args, f"out={tmp_path / 'masks'}", "num_workers=0"]) == 2
    assert "a.png" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "masks").iterdir() if p.name != ".dinokit.lock"} == truth
    out = tmp_path / "predictions"
    assert main([*args, f"out={out}", "num_workers=0"]) == 0 and main([*args, f"out={out}", "num_workers=0"]) == 0


def test_track_never_writes_over_masks_no_track_run_wrote(tmp_path, capsys):
    """`dinokit track frames=F first_mask=first.png out=GT` (no ground_truth= given) wrote each frame's
    mask over GT/<frame>.png, files no track run had written (the ground truth, kept elsewhere than the
    first mask). A folder without track.json holding a file this run would write is now refused."""
    small_video(tmp_path)
    (tmp_path / "first.png").write_bytes((tmp_path / "truth" / "f0.png").read_bytes())
    (tmp_path / "truth" / "f0.png").unlink()
    truth = {p.name: p.read_bytes() for p in (tmp_path / "truth").iterdir()}
    args = ["track", "model=random:vit_nano_p2", f"frames={tmp_path / 'frames'}", "image_size=32", "device=cpu"]
    args.append(f"first_mask={tmp_path / 'first.png'}")
    assert main([*args, f"out={tmp_path / 'truth'}"]) == 2
    assert "f1.png" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "truth").iterdir()} == truth
    assert main([*args, f"out={tmp_path / 'o'}"]) == 0 and main([*args, f"out={tmp_path / 'o'}"]) == 0


def test_segment_never_writes_over_masks_no_segment_run_wrote(tmp_path, capsys):
    """`dinokit segment ... target=photos/ out=labels/` replaced labels/<name>_mask.png, hand-made masks
    that no segment run wrote (no segment.json there). Now refused before the model is loaded."""
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "photos" / "a.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    Image.fromarray(mask).save(tmp_path / "ref_mask.png")
    Image.fromarray(mask * 255).save(tmp_path / "labels" / "a_mask.png")
    before = (tmp_path / "labels" / "a_mask.png").read_bytes()
    args = ["segment", "model=random:vit_nano_p2", f"reference={tmp_path / 'photos' / 'a.png'}", "image_size=32"]
    args += [f"reference_mask={tmp_path / 'ref_mask.png'}", f"target={tmp_path / 'photos'}", "device=cpu"]
    assert main([*args, f"out={tmp_path / 'labels'}"]) == 2
    assert "a_mask.png" in capsys.readouterr().err
    assert (tmp_path / "labels" / "a_mask.png").read_bytes() == before
    assert not (tmp_path / "labels" / "a_overlay.png").exists()
    assert main([*args, f"out={tmp_path / 'o'}"]) == 0 and main([*args, f"out={tmp_path / 'o'}"]) == 0


def test_a_segment_run_stopped_partway_can_be_rerun_into_its_out(tmp_path, monkeypatch, capsys):
    """A segment run stopped after its first target's mask (Ctrl-C, a crash) left that mask without the
    segment.json it wrote at the end, and the same command run again was refused as if the mask were
    the user's. segment.json is now written first, so the rerun replaces its own files."""
    import dinokit.maps.commands as commands

    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{name}.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    Image.fromarray(mask).save(tmp_path / "ref_mask.png")
    args = ["segment", "model=random:vit_nano_p2", f"reference={tmp_path / 'photos' / 'a.png'}", "image_size=32"]
    args += [f"reference_mask={tmp_path / 'ref_mask.png'}", f"target={tmp_path / 'photos'}", "device=cpu"]
    args += [f"out={tmp_path / 'seg'}"]
    segment_features, calls = commands.segment_features, []

    def stopped_at_the_second_target(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return segment_features(*a, **k)

    monkeypatch.setattr(commands, "segment_features", stopped_at_the_second_target)
    assert main(args) != 0  # "dinokit: interrupted"
    assert (tmp_path / "seg" / "a_mask.png").is_file() and not (tmp_path / "seg" / "b_mask.png").exists()
    monkeypatch.setattr(commands, "segment_features", segment_features)
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "seg" / "segment.json").read_text())
    assert [Path(r["mask"]).name for r in report["results"]] == ["a_mask.png", "b_mask.png"]
