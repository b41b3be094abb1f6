"""Kill-and-resume: long-running commands stopped partway (SIGKILL, Ctrl-C) leave nothing a later run
reads as complete, and the same command run again finishes as an uninterrupted run would."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_killed(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a Python `script` in a fresh process that SIGKILLs itself partway; its result (-9)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    assert done.returncode == -9, done.stderr  # killed where the script says, not failed before
    return done


# ------------------------------------------------------------------------------------ downloads
@pytest.mark.parametrize("where", ["mid-download", "checking the download"])
def test_a_download_killed_partway_leaves_no_file_in_the_cache_after_the_next_one(where, tmp_path, monkeypatch):
    """torch.hub writes a download to a temporary `<dst>.<uuid>.partial` beside it and dinokit's atomic
    write to `.<name>.tmp<pid>`, both in the cache folder: a download killed partway (SIGKILL, a closed
    laptop) left them there for good, up to a whole model in size, and every later download that was
    killed added one. The next download of the name now removes what a killed one left (never a live
    one's), and caches the whole file."""
    from dinokit.models import hub

    served = tmp_path / "served" / "dinov2_vits14_pretrain.pth"
    served.parent.mkdir()
    torch.save({"w": torch.arange(100_000.0)}, served)  # over torch.hub's 128 KB chunk: killed mid-file
    cache = tmp_path / "cache"
    kill = "os.kill(os.getpid(), signal.SIGKILL)"
    patch = (
        f"torch.hub.tqdm = type('Killed', (), {{'__init__': lambda s, **k: None, '__enter__': lambda s: s, "
        f"'__exit__': lambda s, *a: None, 'update': lambda s, n: {kill}}})"
        if where == "mid-download"
        else f"hub.check_whole_archive = lambda path, url: {kill}"
    )
    run_killed(
        f"""
        import os, signal
        import torch.hub
        from dinokit.models import hub
        hub.official_url = lambda name: {served.as_uri()!r}
        {patch}
        hub.resolve("dinov2_vits14")
        """,
        env={"DINOKIT_CACHE": str(cache)},
    )
    assert not (cache / served.name).exists()  # never cached as if complete
    assert [p.name for p in cache.iterdir()]  # what the killed download left

    monkeypatch.setenv("DINOKIT_CACHE", str(cache))
    monkeypatch.setattr(hub, "official_url", lambda name: served.as_uri())
    assert hub.resolve("dinov2_vits14") == cache / served.name
    assert sorted(p.name for p in cache.iterdir()) == [served.name]
    assert (cache / served.name).read_bytes() == served.read_bytes()


# ------------------------------------------------------------------------------------ index add
@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """Two `dinokit embed` folders (emb_a: 8 images, emb_b: 5) of a tiny model, and the model file."""
    import numpy as np

    import dinokit
    from dinokit.features.embed import embed
    from tests.conftest import random_images

    root = tmp_path_factory.mktemp("embeddings")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    weights = dinokit.export_model(dinokit.create_model("vit_micro_p4", depth=2), root / "m.safetensors")
    for part, count in (("a", 8), ("b", 5)):
        random_images(root / part, count, 20, rng, prefix=part)
        embed(str(weights), str(root / part), str(root / f"emb_{part}"), image_size=16, num_workers=0, progress=False)
    return root


def index_files(folder: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """(file names, indexed paths, indexed vectors) of an index folder."""
    from dinokit.retrieval.index import FeatureIndex

    index = FeatureIndex.load(folder)
    vectors = torch.from_numpy(index.index.reconstruct_n(0, index.index.ntotal))
    return sorted(p.name for p in folder.iterdir()), index.paths, vectors


@pytest.mark.parametrize("where", ["writing the index file", "after switching index.json"])
def test_an_index_add_killed_partway_then_run_again_leaves_one_generation(where, embeddings, tmp_path):
    """An add writes generation g + 1 of index-<g>.faiss and paths-<g>.txt, switches index.json to it and
    then removes generation g. Killed while faiss wrote the file, it left its temporary file (an index in
    size) for good; killed after the switch, generation g stayed beside g + 1 for good: every later add
    removes only the generation before its own. The add run again now finishes with the files of one
    generation, holding what an uninterrupted add holds."""
    from dinokit.retrieval.commands import build_index

    reference = tmp_path / "reference"
    build_index(str(embeddings / "emb_a"), str(reference))
    build_index(str(embeddings / "emb_b"), str(reference), add=True)
    out = tmp_path / "index"
    build_index(str(embeddings / "emb_a"), str(out))
    kill = "os.kill(os.getpid(), signal.SIGKILL)"
    patch = (
        f"faiss.write_index = lambda index, path: (open(path, 'wb').write(b'half an index'), {kill})"
        if where == "writing the index file"
        else f"real = index.write_json; index.write_json = lambda path, obj: (real(path, obj), {kill})"
    )
    run_killed(
        f"""
        import os, signal
        import faiss
        from dinokit.retrieval import index
        from dinokit.retrieval.commands import build_index
        {patch}
        build_index({str(embeddings / "emb_b")!r}, {str(out)!r}, add=True)
        """
    )
    build_index(str(embeddings / "emb_b"), str(out), add=True)
    names, paths, vectors = index_files(out)
    reference_names, reference_paths, reference_vectors = index_files(reference)
    assert len([n for n in names if n.endswith(".faiss")]) == 1  # one generation, no temporary file
    assert [n.replace("2", "1") for n in names] == reference_names  # the same files (of another generation)
    assert paths == reference_paths and torch.equal(vectors, reference_vectors)


# ------------------------------------------------------------------------------------ export
@pytest.mark.filterwarnings("ignore:no named architecture")  # the .pth of a small model read back: expected
@pytest.mark.parametrize("name", ["vits.safetensors", "vits.pth"])
def test_an_export_killed_mid_write_leaves_no_file_beside_the_next_one(name, embeddings, tmp_path):
    """`dinokit export` wrote the weights through atomic_write's `.<name>.tmp<pid>`: an export killed
    mid-write left that file beside out= for good, a model in size (an ONNX export's temporary folder was
    already removed by the next export). The next export now removes it, and writes what an
    uninterrupted export writes."""
    from dinokit.cli import main
    from dinokit.models import load_model

    model = embeddings / "m.safetensors"
    out = tmp_path / "out"
    out.mkdir()
    kill = "os.kill(os.getpid(), signal.SIGKILL)"
    writer = "loading.save_file" if name.endswith(".safetensors") else "torch.save"
    run_killed(
        f"""
        import os, signal
        import torch
        from dinokit.cli import main
        from dinokit.models import loading
        {writer} = lambda obj, path, **kw: (open(path, 'wb').write(b'PK half a model'), {kill})
        main(["export", "model={model}", "out={out / name}"])
        """
    )
    assert not (out / name).exists()
    assert main(["export", f"model={model}", f"out={out / name}"]) == 0
    assert [p.name for p in out.iterdir()] == [name]
    exported, original = load_model(out / name).state_dict(), load_model(model).state_dict()
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)


# ------------------------------------------------------------------------------------ eval linear
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A labelled train / val split of rendered shapes, 16 px."""
    from dinokit.data.synthetic import write_classification_set

    root = tmp_path_factory.mktemp("shapes")
    write_classification_set(root, per_class=6, size=16, seed=0, split="train")
    write_classification_set(root, per_class=2, size=16, seed=1, split="val")
    return root


def test_eval_linear_stopped_after_its_head_leaves_no_earlier_result_beside_it(shapes, tmp_path, monkeypatch, capsys):
    """eval linear rerun into its out= wrote the new linear_head.safetensors, then linear.json: a run
    stopped between the two (Ctrl-C, a kill) left the earlier run's linear.json, its scores and protocol,
    beside the new run's head, which `predict classification head=out` then applied. The earlier result
    is now removed before the new head is written (as eval segmentation / depth do), Ctrl-C is one line,
    and the same command run again writes both."""
    from dinokit.cli import main
    from dinokit.eval import classification
    from dinokit.eval.heads import load_head_file

    out = tmp_path / "lin"
    common = ["model=random:vit_nano_p2", "image_size=16", "num_workers=0", f"cache={tmp_path / 'cache'}"]
    args = ["eval", "linear", *common, f"train={shapes / 'train'}", f"val={shapes / 'val'}", f"out={out}"]
    assert main([*args, "epochs=1", "learning_rates=[0.01]"]) == 0  # an sgd run's result and head
    real_write_json = classification.write_json

    def stopped_at_the_result(path, obj):
        if Path(path).name == "linear.json":
            raise KeyboardInterrupt
        real_write_json(path, obj)

    monkeypatch.setattr(classification, "write_json", stopped_at_the_result)
    capsys.readouterr()
    assert main([*args, "method=logreg", "logreg_values=3"]) == 130
    assert capsys.readouterr().err == "dinokit: interrupted\n"
    assert load_head_file(out / "linear_head.safetensors")[1]["method"] == "logreg"
    assert not (out / "linear.json").exists()  # not the sgd run's result beside the logreg head

    monkeypatch.setattr(classification, "write_json", real_write_json)
    assert main([*args, "method=logreg", "logreg_values=3"]) == 0
    result = json.loads((out / "linear.json").read_text())
    assert result["protocol"]["method"] == load_head_file(out / "linear_head.safetensors")[1]["method"] == "logreg"


# ------------------------------------------------------------------------------------ embed
def test_ctrl_c_in_embed_says_how_to_resume_on_a_line_of_its_own_and_the_rerun_equals_one_run(
    embeddings, tmp_path, monkeypatch, capsys
):
    """Ctrl-C during `dinokit embed` printed 'embed: stopped; ...' at the end of the progress bar's line
    (the bar was left open), and the bar drew itself again after 'dinokit: interrupted'. The bar is now
    closed first: the stop is a line of its own, then the CLI's, and nothing after them. The same command
    then computes only the missing shards, and its embeddings equal an uninterrupted run's."""
    from dinokit.cli import main
    from dinokit.features import embed as embed_module
    from dinokit.features.store import read_embeddings

    command = ["embed", f"model={embeddings / 'm.safetensors'}", f"data={embeddings / 'a'}", "image_size=16"]
    command += ["num_workers=0", "batch_size=2", "shard_size=2"]
    assert main([*command, f"out={tmp_path / 'reference'}", "progress=false"]) == 0
    real_iter = embed_module.iter_features

    def stopped_after_two_batches(*args, **kwargs):
        for number, batch in enumerate(real_iter(*args, **kwargs)):
            if number == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(embed_module, "iter_features", stopped_after_two_batches)
    capsys.readouterr()
    assert main([*command, f"out={tmp_path / 'run'}"]) == 130
    err = capsys.readouterr().err
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines()]  # as a terminal shows them
    assert lines[-2:] == [
        f"embed: stopped; 2 of 4 shards are saved in {tmp_path / 'run'}, and the same command resumes from there",
        "dinokit: interrupted",
    ]
    monkeypatch.setattr(embed_module, "iter_features", real_iter)
    assert main([*command, f"out={tmp_path / 'run'}", "progress=false"]) == 0
    assert '"computed_shards": 2' in capsys.readouterr().out
    features, paths = read_embeddings(tmp_path / "run")
    reference, reference_paths = read_embeddings(tmp_path / "reference")
    assert paths == reference_paths and torch.equal(features["cls"], reference["cls"])


# ------------------------------------------------------------------------------------ finetune
@pytest.mark.parametrize("killed_at", [2, 9])
def test_a_finetune_killed_mid_epoch_resumes_to_the_uninterrupted_result(killed_at, tmp_path):
    """SIGKILL in epoch 0 (before any checkpoint) or 1 (no stop checkpoint: the run resumes from epoch
    0's), then resume=true: the same history, weights and metrics rows (each iteration once) as an
    uninterrupted run, and no file that the killed run left beside its outputs."""
    from dinokit.data.synthetic import write_classification_set
    from dinokit.train.finetune import finetune
    from dinokit.train.metrics_log import read_metrics

    write_classification_set(tmp_path / "data", per_class=6, size=16, seed=0, split="train")
    write_classification_set(tmp_path / "data", per_class=2, size=16, seed=1, split="val")
    keys = dict(
        train=str(tmp_path / "data" / "train"),
        val=str(tmp_path / "data" / "val"),
        model="random:vit_nano_p2",
        image_size=16,
        batch_size=8,
        num_workers=0,
        device="cpu",
        precision="fp32",
        progress=False,
        tensorboard=False,
        epochs=2,
        log_every=2,
        lr=0.1,
    )
    whole = json.loads(Path(finetune(out=str(tmp_path / "whole"), **keys)).read_text())
    out = tmp_path / "killed"
    run_killed(
        f"""
        import os, signal
        from dinokit.train.finetune import Finetuner, finetune
        step = Finetuner.step

        def killed(self, *args):
            if self.iteration == {killed_at}:  # an epoch is 6 steps; its checkpoint is written at its end
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, *args)

        Finetuner.step = killed
        finetune(out={str(out)!r}, **{keys!r})
        """
    )
    resumed = json.loads(Path(finetune(out=str(out), resume=True)).read_text())

    def without_minutes(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "minutes"} for row in rows]

    assert without_minutes(resumed["history"]) == without_minutes(whole["history"])
    assert resumed["fine_tuned_weights_hash"] == whole["fine_tuned_weights_hash"]
    rows, whole_rows = read_metrics(out / "metrics.jsonl"), read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert without_minutes(rows) == without_minutes(whole_rows)
    assert sorted(p.name for p in out.rglob("*")) == sorted(p.name for p in (tmp_path / "whole").rglob("*"))


# ------------------------------------------------------------------------------------ demo
def test_a_demo_stopped_while_rendering_its_test_images_renders_them_all_on_the_next_run(tmp_path, monkeypatch):
    """The demo renders its shapes once (train, then test) and skipped rendering where shapes/test existed:
    stopped partway through the test split, the next `make demo` evaluated the k-NN on the few test
    images (and shapes) rendered before the stop, as if that were the test set. The shapes folder is now
    written whole or not at all, so the next run renders every image."""
    from dinokit import demo

    monkeypatch.setitem(demo.SYNTHETIC, "train_per_class", 2)
    monkeypatch.setitem(demo.SYNTHETIC, "test_per_class", 2)
    real_write = demo.write_object_set

    def stopped_in_the_test_split(root, per_class, size, seed, split):
        if split == "test":
            (root / split / demo.SHAPES[0]).mkdir(parents=True)  # the first shape's folder, then Ctrl-C
            raise KeyboardInterrupt
        return real_write(root, per_class, size, seed, split)

    monkeypatch.setattr(demo, "write_object_set", stopped_in_the_test_split)
    with pytest.raises(KeyboardInterrupt):
        demo.prepare_data(tmp_path / "demo", None)
    monkeypatch.setattr(demo, "write_object_set", real_write)
    data = demo.prepare_data(tmp_path / "demo", None)
    assert len(data["test"]) == 2 * len(demo.SHAPES) and len(data["train"]) == 2 * len(demo.SHAPES)
    assert sorted(set(data["test_labels"])) == list(range(len(demo.SHAPES)))
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["shapes", "train_images.txt"]


# ------------------------------------------------------------------------------------ curation
def test_a_curation_step_killed_partway_keeps_the_earlier_output_and_the_rerun_leaves_nothing_else(
    embeddings, tmp_path
):
    """`dinokit curate dedup` killed while it writes its new output over an earlier one: the earlier output
    stays whole; the same command then writes what an uninterrupted run writes, and nothing of the
    killed run stays beside it."""
    from dinokit.cli import main

    out = tmp_path / "dedup"
    command = ["curate", "dedup", f"features={embeddings / 'emb_a'}", f"out={out}", "device=cpu"]
    assert main([*command, "threshold=0.99"]) == 0
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    run_killed(
        f"""
        import os, signal
        from dinokit.cli import main
        from dinokit.curation import commands
        real = commands.write_json
        commands.write_json = lambda path, obj: (real(path, obj), os.kill(os.getpid(), signal.SIGKILL))
        main({[*command, "threshold=0.5"]!r})
        """
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    assert main([*command, "threshold=0.5"]) == 0
    assert main([*command[:3], f"out={tmp_path / 'reference'}", "device=cpu", "threshold=0.5"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dedup", "reference"]
    assert (out / "kept.txt").read_text() == (tmp_path / "reference" / "kept.txt").read_text()


# ------------------------------------------------------------------------------------ eval feature cache
def test_eval_knn_killed_while_caching_features_reruns_to_the_same_result(shapes, tmp_path):
    """`dinokit eval knn` killed after writing a shard's arrays but before its rows.json (the shard's
    mark of completion): the cache entry holds its key (meta.json) and the killed writer's temporary
    folder, never a shard a reader takes as complete; the rerun extracts that shard, removes the
    folder, and scores as an uninterrupted run."""
    from dinokit.cli import main

    cache = tmp_path / "cache"
    common = ["eval", "knn", "model=random:vit_nano_p2", "image_size=16", "num_workers=0", "batch_size=8"]
    common += [f"train={shapes / 'train'}", f"val={shapes / 'val'}"]
    assert main([*common, f"out={tmp_path / 'reference'}", "cache=none"]) == 0
    run_killed(
        f"""
        import os, signal
        from dinokit.cli import main
        from dinokit.eval import cache
        real = cache.write_json
        def killed_at_rows(path, obj):
            if path.name == "rows.json":
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, obj)
        cache.write_json = killed_at_rows
        main({[*common, f"out={tmp_path / 'knn'}", f"cache={cache}"]!r})
        """
    )
    (entry,) = cache.iterdir()
    assert [p.name for p in entry.iterdir() if not p.name.startswith(".shard-00000.tmp-")] == ["meta.json"]
    assert main([*common, f"out={tmp_path / 'knn'}", f"cache={cache}"]) == 0
    assert not [p for p in cache.rglob(".*")]  # the killed writer's folder is gone
    assert all((split / "shard-00000" / "rows.json").is_file() for split in cache.iterdir())  # train's and val's
    result, reference = (json.loads((tmp_path / out / "knn.json").read_text()) for out in ("knn", "reference"))
    assert (result["top1"], result["top5"]) == (reference["top1"], reference["top5"])
