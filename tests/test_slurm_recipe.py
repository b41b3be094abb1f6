"""examples/slurm/pretrain.sbatch run by bash on this machine, with stub `srun` and `scontrol` first on
PATH and the SLURM_* variables SLURM sets: srun starts the script's torchrun once per "node" (here:
processes on localhost), whose c10d rendezvous is real. A job stopped near its time limit (SIGUSR1 to
the batch shell) saves a checkpoint and requeues itself, a pre-empted one (SIGTERM to the shell and the
torchruns) saves a checkpoint; the requeued job, the same script again, continues the run to its end.
Processes that get SIGTERM from SLURM and again from torchrun stop with a checkpoint too."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pretrain_helpers import TINY, run_torchrun, tiny_images

import dinokit
from dinokit.train.checkpoint import list_checkpoints, load_checkpoint
from dinokit.train.metrics_log import read_metrics

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "examples" / "slurm" / "pretrain.sbatch"
JOB_ID = "4242"

# srun --ntasks-per-node=1 on SLURM_NNODES nodes: the command once per node, all on this machine, with
# the task's SLURM_NODEID / SLURM_PROCID / SLURM_LOCALID; the tasks' pids go to $STUB_DIR/tasks (the
# job step's, which the scancel stub signals). As srun does (src/srun/srun_job.c: _srun_signal_mgr), a
# SIGTERM, SIGHUP or SIGQUIT to srun SIGKILLs the tasks; SIGINT and SIGUSR1 are forwarded. Exit status:
# the highest of the tasks'. Its options (all --name=value) are logged and skipped.
SRUN = """#!/bin/bash
echo "srun $*" >> "$STUB_DIR/log"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
printf '%s\\n' "${pids[@]}" > "$STUB_DIR/tasks"
trap 'echo "srun: forcing job termination"; kill -KILL "${pids[@]}" 2>/dev/null' TERM HUP QUIT
trap 'kill -INT "${pids[@]}" 2>/dev/null' INT
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
status=0
for pid in "${pids[@]}"; do
    while true; do
        wait "$pid"; code=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    (( code > status )) && status=$code
done
exit $status
"""

# scontrol show hostnames: every node is this machine; scontrol requeue: logged
SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STUB_DIR/log"
if [[ $1 == show && $2 == hostnames ]]; then
    for ((node = 0; node < SLURM_NNODES; node++)); do echo localhost; done
fi
"""

# scancel --signal=SIG <job>: SIG to the job steps' tasks (the torchruns srun started), not the batch shell
SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$STUB_DIR/log"
[[ $1 == --signal=* ]] && kill -s "${1#--signal=}" $(cat "$STUB_DIR/tasks")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_environment(tmp_path: Path, nodes: int, nproc_per_node: int, max_iterations: int) -> dict:
    """The environment of the batch script in a SLURM job of `nodes` nodes (stubs first on PATH), with
    the script's knobs set to a tiny CPU run."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("scancel", SCANCEL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    keys = {**{k: v for k, v in TINY.items() if k != "preset"}, "max_iterations": max_iterations, "batch_size": 4}
    slurm = {"SLURM_JOB_ID": JOB_ID, "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": f"node[1-{nodes}]"}
    knobs = {
        "DINOKIT_DATA": str(tiny_images(tmp_path / "data")),
        "DINOKIT_OUT": str(tmp_path / "run"),
        "DINOKIT_PRESET": TINY["preset"],
        "DINOKIT_KEYS": " ".join(f"{k}={v}" for k, v in keys.items()),
        "DINOKIT_NPROC_PER_NODE": str(nproc_per_node),
        "DINOKIT_PYTHON": sys.executable,
        "DINOKIT_PORT": str(free_port()),
    }
    return {
        **os.environ,
        **slurm,
        **knobs,
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "STUB_DIR": str(stubs),
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
    }


def start_job(env: dict, log: Path) -> subprocess.Popen:
    """`bash pretrain.sbatch`, as slurmstepd runs a batch script, its output appended to `log`."""
    with open(log, "a") as out:
        command = ["bash", str(SCRIPT)]
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(job: subprocess.Popen, timeout: float) -> int:
    """The job's exit status; on a timeout the test fails, and the job's processes are stopped."""
    try:
        return job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        pytest.fail(f"the job still ran after {timeout} s")


def signal_the_job(job: subprocess.Popen, tmp_path: Path, how: str) -> None:
    """As SLURM signals a job: near its time limit (--signal=B:USR1) the batch shell alone; on
    pre-emption (or scancel) SIGTERM to every step's tasks: the batch shell and the torchruns."""
    if how == "time_limit":
        job.send_signal(signal.SIGUSR1)
        return
    job.send_signal(signal.SIGTERM)
    for pid in (tmp_path / "stubs" / "tasks").read_text().split():
        os.kill(int(pid), signal.SIGTERM)


@pytest.mark.parametrize("how", ["time_limit", "preemption"])
def test_a_two_node_job_stopped_by_slurm_checkpoints_and_its_requeued_job_continues(tmp_path, how):
    """Near the time limit the job stops its steps with a checkpoint and requeues itself; pre-empted, it
    stops with a checkpoint and leaves the requeue to SLURM. The requeued job, the same script, continues."""
    env = job_environment(tmp_path, nodes=2, nproc_per_node=1, max_iterations=20)
    out, log = tmp_path / "run", tmp_path / "job.out"

    # the first job, signalled once training runs
    job = start_job(env, log)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not read_metrics(out / "metrics.jsonl"):
        assert job.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    signal_the_job(job, tmp_path, how)
    assert finish(job, timeout=120) != 0
    output = log.read_text()
    (checkpoint,) = list_checkpoints(out / "checkpoints")
    stopped_at = load_checkpoint(checkpoint)["iteration"]
    assert 2 <= stopped_at < 20, output[-3000:]
    assert f"stopped by SIGTERM at iteration {stopped_at}, checkpoint saved" in output, output[-3000:]
    assert not (out / "backbone.safetensors").exists() and "forcing job termination" not in output
    stub_log = (tmp_path / "stubs" / "log").read_text()
    assert (f"scontrol requeue {JOB_ID}" in stub_log) == (how == "time_limit")  # pre-empted: SLURM requeues
    srun_line = next(line for line in stub_log.splitlines() if line.startswith("srun "))
    port = env["DINOKIT_PORT"]
    for flag in ("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}"):
        assert flag in srun_line.split(), srun_line
    assert f"--rdzv_id={JOB_ID}" in srun_line.split() and "resume=true" in srun_line.split()
    first_rows = read_metrics(out / "metrics.jsonl")
    assert (out / ".dinokit.lock").exists()  # the first job's lock file stays; its lock died with it

    # the requeued job: the same script and settings, from the start
    first_output = len(log.read_text())
    assert finish(start_job({**env, "SLURM_RESTART_COUNT": "1"}, log), timeout=180) == 0, log.read_text()[-3000:]
    assert "holds no run yet" not in log.read_text()[first_output:]
    rows = read_metrics(out / "metrics.jsonl")
    iterations = [row["iteration"] for row in rows]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 20, iterations
    assert rows[: len(first_rows)] == first_rows  # continued after them: not trained again from iteration 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        f"checkpoint_{stopped_at:08d}.pt",
        "checkpoint_00000020.pt",
    ]
    final = load_checkpoint(out / "checkpoints" / "checkpoint_00000020.pt")
    assert final["global_batch"] == 8 and final["samples_seen"] == 20 * 8  # 2 nodes x 1 process x batch 4
    assert dinokit.load_model(out / "backbone.safetensors")
    requeues = (tmp_path / "stubs" / "log").read_text().count("scontrol requeue")
    assert requeues == (how == "time_limit")  # a finished job does not requeue


def test_a_one_node_job_of_two_processes_finishes_and_its_requeue_trains_no_further(tmp_path):
    """One torchrun of 2 processes (--nnodes=1, the same rendezvous); a finished run's job started again
    (requeued after its end, e.g. a node failure at exit) resumes at its last iteration and stops there."""
    env = job_environment(tmp_path, nodes=1, nproc_per_node=2, max_iterations=4)
    out, log = tmp_path / "run", tmp_path / "job.out"
    assert finish(start_job(env, log), timeout=120) == 0, log.read_text()[-3000:]
    assert "2 process(es) x batch 4 = 8" in log.read_text()
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [2, 4]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint_00000004.pt"]
    assert dinokit.load_model(out / "backbone.safetensors")

    assert finish(start_job({**env, "SLURM_RESTART_COUNT": "1"}, log), timeout=120) == 0, log.read_text()[-3000:]
    assert read_metrics(out / "metrics.jsonl") == rows
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint_00000004.pt"]
    assert log.read_text().count("pretrain: done, 4 iterations") == 2
    assert "scontrol requeue" not in (tmp_path / "stubs" / "log").read_text()


# SLURM with ProctrackType=proctrack/linuxproc signals every process of a job step, torchrun's processes
# too, and torchrun passes its own SIGTERM on: each process gets SIGTERM twice. Here in the third step:
# each process signals itself, process 0 also torchrun, and the step lasts until torchrun's has come.
SIGTERM_TO_THE_PROCESS_TREE = """
import importlib, os, signal, sys, time
from dinokit.cli import main
pretrain = importlib.import_module("dinokit.train.pretrain")
step = pretrain.Trainer.step
def signalled_step(self, *args):
    if self.iteration == 2:
        os.kill(os.getpid(), signal.SIGTERM)
        if os.environ["RANK"] == "0":
            os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(2)
    return step(self, *args)
pretrain.Trainer.step = signalled_step
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_processes_signalled_by_slurm_and_by_torchrun_stop_with_a_checkpoint(tmp_path):
    """The second SIGTERM (torchrun's) killed each process during the step, before its checkpoint."""
    data = tiny_images(tmp_path / "data")
    (tmp_path / "run.py").write_text(SIGTERM_TO_THE_PROCESS_TREE)
    keys = {**TINY, "max_iterations": 20, "batch_size": 4}
    args = [str(tmp_path / "run.py"), f"data={data}", f"out={tmp_path / 'run'}"] + [f"{k}={v}" for k, v in keys.items()]
    result = run_torchrun(args, timeout=120)
    assert result.returncode != 0
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint_00000003.pt"], (
        result.stderr[-3000:]
    )
    assert "pretrain: stopped by SIGTERM at iteration 3, checkpoint saved" in result.stdout
