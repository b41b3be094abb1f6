"""Two CPU processes (gloo): DDP pretraining keeps the teachers identical; centering, Sinkhorn-Knopp
and the health figures reduced over processes equal their single-process values on the whole batch;
a 2-process run resumes in one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from pretrain_helpers import TINY, run_torchrun, tiny_images

import dinokit
from dinokit import distributed as dist
from dinokit.data.synthetic import write_classification_set
from dinokit.losses import EMACenter, sinkhorn_knopp
from dinokit.train.checkpoint import list_checkpoints, load_checkpoint
from dinokit.train.metrics_log import read_metrics
from dinokit.train.pretrain import Trainer, run_config
from dinokit.train.self_distillation import collapse_figures

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_names() -> list[str]:
    return sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))


def worker(rank: int, port: int, data: str, out: str, results: str, bad_data: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    device = dist.init_distributed(torch.device("cpu"))
    # collectives on a global batch split over the processes
    torch.manual_seed(0)
    logits = torch.randn(8, 5) * 3
    mine = logits.chunk(WORLD)[rank]
    center = EMACenter(5, momentum=0.5)
    center.update(mine)
    figures = collapse_figures(torch.softmax(logits, -1).chunk(WORLD)[rank], logits.chunk(WORLD)[rank])
    torch.save(
        {"sk": sinkhorn_knopp(mine, 0.1), "center": center.center, "figures": figures},
        f"{results}/collectives{rank}.pt",
    )
    # a DDP run
    # a fast teacher from the first step, so that the FSDP run's teacher would drift if it went stale
    keys = {**{k: v for k, v in TINY.items() if k != "preset"}, "momentum_teacher": 0.9, "warmup": 0.0}
    cfg, resuming = run_config(Path(out), "dinov2_vits14", {**keys, "max_iterations": 6, "batch_size": 4}, False)
    trainer = Trainer(cfg, data, Path(out), "dinov2_vits14", device, resuming)
    trainer.run()
    torch.save({k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}, f"{results}/teacher{rank}.pt")
    del trainer
    # an FSDP2 run, with the k-NN monitor every 3 iterations (which must leave training as it is) and
    # activation checkpointing inside the sharded blocks (which must too)
    fsdp_out = Path(out).with_name("fsdp")
    labelled = Path(out).with_name("labelled")
    knn = {"knn_every": 3, "knn_train": str(labelled / "train"), "knn_val": str(labelled / "val")}
    given = {**keys, "max_iterations": 6, "batch_size": 4, "fsdp": True, "activation_checkpointing": True, **knn}
    cfg, _ = run_config(fsdp_out, "dinov2_vits14", given, False)
    Trainer(cfg, data, fsdp_out, "dinov2_vits14", device, False).run()
    # a run over 2 unreadable files, which both processes meet (in different passes), then resumed;
    # DDP with activation checkpointing, switched off at the resume
    bad_out = Path(out).with_name("bad_files_run")
    for iterations, resume in ((6, False), (12, True)):
        given = {**keys, "max_iterations": iterations, "batch_size": 4, "log_every": 1}
        given["activation_checkpointing"] = not resume
        cfg, resuming = run_config(bad_out, "dinov2_vits14", given, resume)
        summary = Trainer(cfg, bad_data, bad_out, "dinov2_vits14", device, resuming).run()
    torch.save(summary["bad_files"], f"{results}/bad_files{rank}.pt")
    dist.destroy_distributed()
    Path(f"{results}/left{rank}").touch()  # every run done and the process group left
    if Path("/proc/self/task").is_dir():  # Linux
        Path(f"{results}/threads{rank}").write_text(" ".join(thread_names()))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = tiny_images(root / "data")
    (root / "results").mkdir()
    for split, seed in (("train", 0), ("val", 1)):  # the FSDP run's k-NN monitor data
        write_classification_set(root / "labelled", per_class=3, size=16, seed=seed, split=split)
    bad_data = tiny_images(root / "bad_data")
    for name in ("empty.png", "text.png"):
        (bad_data / "circle" / name).write_bytes(b"" if name == "empty.png" else b"not an image")
    args = (free_port(), str(data), str(root / "run"), str(root / "results"), str(bad_data))
    try:
        mp.spawn(worker, args=args, nprocs=WORLD, join=True)
    except mp.ProcessExitedException as e:
        # Seen once in six runs here: a process killed by SIGABRT ("terminate called without an active
        # exception") after its runs had finished and it had left the process group, i.e. in the
        # interpreter's exit, where gloo's C++ threads are torn down (pytorch/pytorch#179291). Both known
        # causes, gloo threads still running after the group is left, are gone
        # (test_leaving_the_process_group_ends_its_gloo_threads, test_no_gloo_threads_outlive_the_runs);
        # should another remain, what this module tests is complete then; a crash any earlier fails it.
        if e.signal_name != "SIGABRT" or not all((root / "results" / f"left{r}").exists() for r in range(WORLD)):
            raise
        warnings.warn(f"{e} after every process had finished and left the process group", stacklevel=1)
    return root, data


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc (Linux)")
def test_no_gloo_threads_outlive_the_runs(ddp_run):
    """After a DDP and an FSDP2 run, leaving the process group ends gloo's threads. The FSDP2 run kept
    them running into the interpreter's exit (where they may abort the process): DTensor's sharding
    caches keep the device mesh alive, and the mesh its process group. dinokit's own mesh lets go of it."""
    root, _ = ddp_run
    for r in range(WORLD):
        threads = (root / "results" / f"threads{r}").read_text()
        assert "gloo" not in threads, threads


def test_teachers_stay_identical_across_processes(ddp_run):
    root, _ = ddp_run
    t0, t1 = (torch.load(root / "results" / f"teacher{r}.pt", weights_only=True) for r in range(WORLD))
    assert t0.keys() == t1.keys()
    assert all(torch.equal(t0[k], t1[k]) for k in t0)
    start = dinokit.create_model("vit_nano_p2", img_size=16)
    moved = t0["backbone.blocks.0.attn.qkv.weight"] - start.state_dict()["blocks.0.attn.qkv.weight"]
    assert moved.abs().max() > 0  # it trained
    rows = read_metrics(root / "run" / "metrics.jsonl")
    assert rows[-1]["iteration"] == 6 and rows[-1]["epoch"] == pytest.approx(6 * 8 / 32)


def test_collectives_match_single_process(ddp_run):
    root, _ = ddp_run
    torch.manual_seed(0)
    logits = torch.randn(8, 5) * 3
    parts = [torch.load(root / "results" / f"collectives{r}.pt", weights_only=True) for r in range(WORLD)]
    torch.testing.assert_close(torch.cat([p["sk"] for p in parts]), sinkhorn_knopp(logits, 0.1))
    center = EMACenter(5, momentum=0.5)
    center.update(logits)
    for p in parts:
        torch.testing.assert_close(p["center"], center.center)
        single = collapse_figures(torch.softmax(logits, -1), logits)
        assert p["figures"] == pytest.approx(single, rel=1e-5)


def test_unreadable_files_are_counted_once_over_processes_and_after_resume(ddp_run):
    """metrics.jsonl's bad_files is the number of different unreadable files, as in one process: it
    summed each process's count (a file met by both: 2), and every process restarted a resumed run
    from the whole count (2 files: 4)."""
    root, _ = ddp_run
    rows = read_metrics(root / "bad_files_run" / "metrics.jsonl")
    counts = [row["bad_files"] for row in rows]
    assert [row["iteration"] for row in rows] == list(range(1, 13))
    assert counts == sorted(counts) and counts[-1] == 2, counts
    assert len((root / "bad_files_run" / "bad_files.txt").read_text().splitlines()) == 2
    assert [torch.load(root / "results" / f"bad_files{r}.pt") for r in range(WORLD)] == [2, 2]  # the summary


def test_fsdp_run_equals_the_ddp_run(ddp_run):
    """The same 6 iterations sharded (FSDP2) and replicated (DDP) end in the same teacher: the
    teacher's heads and embeddings follow the EMA under FSDP too (they went stale without a reshard).
    The FSDP run also ran the k-NN monitor at iterations 3 and 6 (its teacher's forward outside the
    step, the RNG forked) and checkpointed the student's sharded blocks (recomputed in the backward
    with the same drop path): training is the same for both."""
    root, _ = ddp_run
    knn_rows = [row for row in read_metrics(root / "fsdp" / "metrics.jsonl") if "knn_top1" in row]
    assert [row["iteration"] for row in knn_rows] == [3, 6]
    assert all(0 <= row["knn_top1"] <= 100 and row["knn_seconds"] >= 0 for row in knn_rows)
    ddp = torch.load(root / "results" / "teacher0.pt", weights_only=True)
    fsdp = load_checkpoint(root / "fsdp" / "checkpoints" / "checkpoint_00000006.pt")["model"]
    for key, value in ddp.items():
        torch.testing.assert_close(fsdp[f"teacher.{key}"], value, rtol=0, atol=1e-5, msg=key)


def test_fsdp_run_checkpoints_full_state_and_resumes_in_one_process(ddp_run):
    root, data = ddp_run
    checkpoint = load_checkpoint(root / "fsdp" / "checkpoints" / "checkpoint_00000006.pt")
    assert checkpoint["model"]["teacher.backbone.pos_embed"].shape == (1, 65, 32)  # full, unsharded
    backbone = dinokit.load_model(root / "fsdp" / "backbone.safetensors")
    assert torch.equal(backbone.pos_embed, checkpoint["model"]["teacher.backbone.pos_embed"])
    summary = dinokit.pretrain(
        data=str(data),
        out=str(root / "fsdp"),
        resume=True,
        max_iterations=8,
        **{k: v for k, v in TINY.items() if k not in ("batch_size",)},
    )
    assert summary["iterations"] == 8


def test_two_process_run_resumes_in_one_process(ddp_run):
    root, data = ddp_run
    summary = dinokit.pretrain(
        data=str(data),
        out=str(root / "run"),
        resume=True,
        max_iterations=8,
        **{k: v for k, v in TINY.items() if k not in ("batch_size",)},
    )
    assert summary["iterations"] == 8
    checkpoint = load_checkpoint(root / "run" / "checkpoints" / "checkpoint_00000008.pt")
    assert checkpoint["global_batch"] == 8 and checkpoint["samples_seen"] == 64  # the global batch is kept


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(out, result) of `torchrun --nproc_per_node 2 -m dinokit pretrain ... resume=true` into a folder
    without a run (6 iterations of batch 4): the tests below read different things from it."""
    root = tmp_path_factory.mktemp("torchrun")
    data = tiny_images(root / "data")
    out = root / "run"
    keys = {**TINY, "max_iterations": 6, "batch_size": 4, "resume": True}
    args = ["-m", "dinokit", "pretrain", f"data={data}", f"out={out}"] + [f"{k}={v}" for k, v in keys.items()]
    return out, run_torchrun(args, timeout=240)


def test_torchrun_launches_pretraining_on_two_processes(torchrun_run):
    """The documented entry path: `torchrun --nproc_per_node 2 -m dinokit pretrain ...` (gloo on CPU),
    with resume=true as the multi-node command (README) and the SLURM script give it."""
    out, result = torchrun_run
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["iteration"] == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert "2 process(es) x batch 4 = 8" in result.stdout + result.stderr
    assert (out / "backbone.safetensors").exists() and dinokit.load_model(out / "backbone.safetensors")
    summary = json.loads(result.stdout[result.stdout.index("{") :])  # printed once, by process 0
    assert summary["iterations"] == 6 and summary["backbone"] == str(out / "backbone.safetensors")


def test_resume_into_an_empty_folder_says_so_once(torchrun_run):
    """Under torchrun, resume=true into a folder without a run printed its notice once per process."""
    _, result = torchrun_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("holds no run yet: starting a new one") == 1


def run_patched_pretraining(script: str, tmp_path: Path, max_iterations: int) -> subprocess.CompletedProcess:
    """`script` (which patches dinokit, then runs `dinokit pretrain` on its arguments) on 2 processes
    under torchrun, on tiny images, out= tmp_path / "run"."""
    data = tiny_images(tmp_path / "data")
    (tmp_path / "run.py").write_text(script)
    keys = {**TINY, "max_iterations": max_iterations, "batch_size": 4}
    args = [str(tmp_path / "run.py"), f"data={data}", f"out={tmp_path / 'run'}"] + [f"{k}={v}" for k, v in keys.items()]
    return run_torchrun(args, timeout=90)


# A failure on process 1 only, in its third step, while process 0 goes on to the next collective.
FAILING_RUN = """
import importlib, os, sys
from dinokit.cli import main
from dinokit.errors import DinokitError
pretrain = importlib.import_module("dinokit.train.pretrain")
step = pretrain.Trainer.step
def failing_step(self, *args):
    if os.environ["RANK"] == "1" and self.iteration == 2:
        raise DinokitError("a failure on process 1 only")
    return step(self, *args)
pretrain.Trainer.step = failing_step
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_an_error_on_one_process_ends_every_process_with_that_error(tmp_path):
    """The failing process left the process group through a barrier, which waited forever for the
    others (in the next step's collective): no error shown, torchrun hung until the 30-minute timeout."""
    result = run_patched_pretraining(FAILING_RUN, tmp_path, max_iterations=6)
    assert result.returncode != 0
    assert result.stderr.count("dinokit: error: a failure on process 1 only") == 1


# SIGTERM to process 1 only, during its third step.
SIGNALLED_RUN = """
import importlib, os, signal, sys
from dinokit.cli import main
pretrain = importlib.import_module("dinokit.train.pretrain")
step = pretrain.Trainer.step
def signalled_step(self, *args):
    if os.environ["RANK"] == "1" and self.iteration == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return step(self, *args)
pretrain.Trainer.step = signalled_step
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_a_signal_to_one_process_stops_every_process_at_the_same_step_with_a_checkpoint(tmp_path):
    result = run_patched_pretraining(SIGNALLED_RUN, tmp_path, max_iterations=20)
    assert result.returncode != 0
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint_00000003.pt"]
    assert "stopped by a signal to another process at iteration 3, checkpoint saved" in result.stdout
    assert not (tmp_path / "run" / "backbone.safetensors").exists()


def test_sigterm_to_torchrun_reaches_its_processes_which_stop_with_a_checkpoint(tmp_path):
    """A scheduler's SIGTERM goes to torchrun, which passes it on to its processes: they stop at one
    step and save a checkpoint there (README: Checkpoints and resume)."""
    data = tiny_images(tmp_path / "data")
    out = tmp_path / "run"
    keys = {**TINY, "max_iterations": 100000, "batch_size": 4}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    cmd += ["-m", "dinokit", "pretrain", f"data={data}", f"out={out}", *[f"{k}={v}" for k, v in keys.items()]]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    (checkpoint,) = list_checkpoints(out / "checkpoints")
    reached = load_checkpoint(checkpoint)["iteration"]
    assert 2 <= reached < 100000 and f"stopped by SIGTERM at iteration {reached}, checkpoint saved" in output


def test_an_error_of_every_process_before_they_join_is_printed_once(tmp_path):
    """A mistyped key under torchrun was printed by every process, once per process."""
    data = tiny_images(tmp_path / "data")
    args = ["-m", "dinokit", "pretrain", f"data={data}", f"out={tmp_path / 'run'}", "no_such_key=1"]
    result = run_torchrun(args, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("dinokit: error:") == 1, result.stderr[-3000:]
    assert "dinokit: error: unknown pretraining key(s): 'no_such_key'" in result.stderr


def test_an_error_of_every_process_after_they_join_is_printed_once(tmp_path):
    """data= a folder without images: every process found none after joining the process group, and
    every process printed it."""
    (tmp_path / "empty").mkdir()
    keys = {**TINY, "max_iterations": 2, "batch_size": 4}
    args = ["-m", "dinokit", "pretrain", f"data={tmp_path / 'empty'}", f"out={tmp_path / 'run'}"]
    result = run_torchrun(args + [f"{k}={v}" for k, v in keys.items()], timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("dinokit: error:") == 1, result.stderr[-3000:]
    assert f"dinokit: error: no images found under {tmp_path / 'empty'}" in result.stderr


# Process 1 alone finds no images (its node's copy of the data is missing), after joining.
ONE_PROCESS_FINDS_NO_IMAGES = """
import importlib, os, sys
from dinokit.cli import main
from dinokit.errors import DinokitError
pretrain = importlib.import_module("dinokit.train.pretrain")
list_images = pretrain.list_images
def listed(data):
    if os.environ["RANK"] == "1":
        raise DinokitError("no images on process 1")
    return list_images(data)
pretrain.list_images = listed
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_an_error_of_one_process_after_they_join_is_printed_by_it(tmp_path):
    """An error that one process alone hits after joining (compared at once with the others') stays
    that process's, printed by it at once."""
    result = run_patched_pretraining(ONE_PROCESS_FINDS_NO_IMAGES, tmp_path, max_iterations=2)
    assert result.returncode != 0
    assert result.stderr.count("dinokit: error: no images on process 1") == 1, result.stderr[-3000:]
    # process 0, which went on to the next collective, died in it with gloo's traceback; it now stops
    # with a line that names the failed process
    assert "[rank0]: Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("dinokit: error: stopping, as process 1 failed: no images on process 1") == 1


# The k-NN monitor runs out of memory on process 1 alone.
KNN_MONITOR_FAILS_ON_PROCESS_1 = """
import importlib, os, sys
from dinokit.cli import main
pretrain = importlib.import_module("dinokit.train.pretrain")
knn_top1 = pretrain.knn_top1
def failing(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise MemoryError("k-NN out of memory on process 1")
    return knn_top1(*args, **kwargs)
pretrain.knn_top1 = failing
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_a_knn_monitor_failing_on_one_process_stops_the_others_with_its_error(tmp_path):
    """Process 1's k-NN failed and it left; process 0 went on to the next step's collective and died
    there with gloo's 'Connection closed by peer' traceback, which did not say why."""
    val = write_classification_set(tmp_path / "data", per_class=2, size=16, seed=1, split="val")
    monitor = f"knn_every=2 knn_train={tmp_path / 'data' / 'train'} knn_val={val}".split()
    script = KNN_MONITOR_FAILS_ON_PROCESS_1.replace("*sys.argv[1:]]", f"*sys.argv[1:], *{monitor!r}]")
    result = run_patched_pretraining(script, tmp_path, max_iterations=4)
    assert result.returncode != 0
    assert "[rank1]: MemoryError: k-NN out of memory on process 1" in result.stderr, result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr, result.stderr[-3000:]
    stopping = "dinokit: error: stopping, as process 1 failed: MemoryError: k-NN out of memory on process 1"
    assert result.stderr.count(stopping) == 1, result.stderr[-3000:]


def test_compare_errors_keeps_a_process_own_error_where_the_comparison_fails(monkeypatch):
    """A process that raised in a compare_errors block, whose gather then failed (another process was
    killed meanwhile, or NCCL found no memory left for its buffers after a CUDA out-of-memory error),
    stopped with the gather's error alone: its own was lost. It keeps its own error now."""
    from dinokit.errors import DinokitError

    def failing_gather(obj):
        raise RuntimeError("[gloo] Connection closed by peer")

    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "all_gather_objects", failing_gather)
    with pytest.raises(DinokitError, match="no images found"), dist.compare_errors():
        raise DinokitError("no images found")
    with pytest.raises(RuntimeError, match="Connection closed"), dist.compare_errors():  # none of its own
        pass


# A fresh interpreter, as torchrun starts: one process joins a gloo group of one, imports what DDP's first
# use imports (torch.distributed.nn, through torch._dynamo), leaves the group, then lists its threads.
LEAVE_GROUP = """
import os, torch
from dinokit import distributed as dist
dist.launched_by_torchrun = lambda: True
dist.init_distributed(torch.device("cpu"))
import torch.distributed.nn
dist.destroy_distributed()
print(sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc (Linux)")
def test_leaving_the_process_group_ends_its_gloo_threads():
    """`torchrun ... dinokit finetune|pretrain` aborted now and then at exit (SIGABRT, 'terminate called
    without an active exception'): torch.distributed.nn, imported by DDP after the group started, holds
    it in default arguments, so destroy_process_group left gloo's worker threads running into the
    interpreter's exit, where one freeing the last collective's tensors may be ended mid-destructor.
    The module is imported before the group now: leaving it joins them."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0"}
    env.update(WORLD_SIZE="1", LOCAL_RANK="0", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    done = subprocess.run([sys.executable, "-c", LEAVE_GROUP], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = done.stdout.strip().splitlines()[-1]
    assert "gloo" not in threads, threads


# Ctrl-C, which torchrun passes on to every process: here each sends SIGINT to itself after a step.
INTERRUPTED_RUN = """
import importlib, os, signal, sys
from dinokit.cli import main
pretrain = importlib.import_module("dinokit.train.pretrain")
step = pretrain.Trainer.step
def interrupted_step(self, *args):
    result = step(self, *args)
    if self.iteration == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return result
pretrain.Trainer.step = interrupted_step
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_an_interrupted_run_says_so_once(tmp_path):
    """Ctrl-C under torchrun printed `dinokit: interrupted` once per process."""
    result = run_patched_pretraining(INTERRUPTED_RUN, tmp_path, max_iterations=6)
    assert result.returncode != 0
    assert result.stderr.count("dinokit: interrupted") == 1, result.stderr[-3000:]


# Process 1 alone fails before the processes join (as one whose LOCAL_RANK has no GPU would), after a
# shortened wait for process 0, which waits for it to join instead of failing too.
ONE_PROCESS_FAILS_BEFORE_JOINING = """
import importlib, os, sys
from dinokit import distributed
from dinokit.cli import main
from dinokit.errors import DinokitError
pretrain = importlib.import_module("dinokit.train.pretrain")
run_config = pretrain.run_config
def failing_run_config(*args):
    if os.environ["RANK"] == "1":
        raise DinokitError("a failure on process 1 before joining")
    return run_config(*args)
pretrain.run_config = failing_run_config
distributed.SHARED_ERROR_WAIT_S = 1.0
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_an_error_of_one_process_before_they_join_is_still_printed(tmp_path):
    result = run_patched_pretraining(ONE_PROCESS_FAILS_BEFORE_JOINING, tmp_path, max_iterations=2)
    assert result.returncode != 0
    assert result.stderr.count("dinokit: error: a failure on process 1 before joining") == 1


# Process 1 lists one image fewer (a copy that differs between nodes, or a folder still being written).
UNEQUAL_DATA_RUN = """
import importlib, os, sys
from dinokit.cli import main
pretrain = importlib.import_module("dinokit.train.pretrain")
list_images = pretrain.list_images
def listed(data):
    paths = list_images(data)
    return paths[:-1] if os.environ["RANK"] == "1" else paths
pretrain.list_images = listed
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_processes_that_list_different_images_stop_with_an_error(tmp_path):
    """Each process built its own shuffled order of the images it listed, so with different lists some
    images were seen twice and others never, silently."""
    result = run_patched_pretraining(UNEQUAL_DATA_RUN, tmp_path, max_iterations=2)
    assert result.returncode != 0
    assert result.stderr.count("the processes list different images") == 1  # every process's: printed once
    assert not (tmp_path / "run" / "checkpoints").exists()


# Process 0 cannot write (a full disk) its config.yaml or metrics.jsonl at the start, or a checkpoint,
# backbone.safetensors or bad_files.txt at the end.
WRITE_FAILS_ON_PROCESS_0 = """
import errno, importlib, os, sys
from pathlib import Path
from dinokit.cli import main
pretrain = importlib.import_module("dinokit.train.pretrain")
def full_disk(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
if "WHICH" in ("config", "bad_files"):
    atomic_write = pretrain.atomic_write
    name = {"config": "config.yaml", "bad_files": "bad_files.txt"}["WHICH"]
    def failing_write(path, write):
        return full_disk(path) if Path(path).name == name else atomic_write(path, write)
    pretrain.atomic_write = failing_write
    write_text = pretrain.write_text  # bad_files.txt: a list of paths, written as their bytes
    def failing_write_text(path, text):
        return full_disk(path) if Path(path).name == name else write_text(path, text)
    pretrain.write_text = failing_write_text
    share = pretrain.Trainer.share_bad_files
    def share_with_one_bad(self):  # every process: one unreadable file met, so bad_files.txt is written
        return share(self) | {"unreadable.png"}
    pretrain.Trainer.share_bad_files = share_with_one_bad
elif "WHICH" == "metrics":  # metrics.jsonl, opened (on resume: rewritten) before the first collective
    pretrain.MetricsLog = lambda folder, *args: full_disk(Path(folder) / "metrics.jsonl")
elif "WHICH" == "metrics_row":  # a row of metrics.jsonl, written after the processes reduced its figures
    pretrain.MetricsLog.write = lambda log, row: full_disk("metrics.jsonl")
elif "WHICH" == "backbone":
    importlib.import_module("dinokit.train.checkpoint").export_model = lambda model, path, **kwargs: full_disk(path)
else:
    pretrain.save_checkpoint = lambda folder, *args: full_disk(folder / "checkpoint.pth")
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


@pytest.mark.parametrize("write", ["config", "metrics", "metrics_row", "checkpoint", "backbone", "bad_files"])
def test_process_0_failing_to_write_stops_the_others_without_a_traceback(tmp_path, write):
    """Process 0 wrote config.yaml and checkpoints alone, then met the others in a collective or
    barrier: its error (a full disk) ended the job, and the others died there with gloo's traceback."""
    result = run_patched_pretraining(WRITE_FAILS_ON_PROCESS_0.replace("WHICH", write), tmp_path, max_iterations=2)
    assert result.returncode != 0
    assert result.stderr.count("dinokit: error:") == 1, result.stderr[-3000:]
    assert "dinokit: error: No space left on device" in result.stderr, result.stderr[-3000:]
    assert "[rank1]: Traceback" not in result.stderr, result.stderr[-3000:]
