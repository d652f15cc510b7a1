"""Two "nodes" on this machine: slurm/train.sbatch with stand-in Slurm commands (see test_slurm.py) and the real
deepspeed launcher, one per node, each with one CPU rank; the nodes meet at localhost."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from bigrm.artifacts import checkpoint
from tests.helpers.runs import SMALL, free_port, launch, train_losses
from tests.helpers.slurm import SCRIPT, fake_slurm

pytestmark = pytest.mark.slow
HOSTS = ["localhost", "127.0.0.1"]  # two names of this machine: two hosts to the launcher
ARGS = [*SMALL, "--export", "false"]


def job_env(tmp_path: Path) -> dict[str, str]:
    env = {"MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return fake_slurm(tmp_path, HOSTS, gpus=1, deepspeed=False, **env)


def sbatch(env: dict[str, str], out: Path) -> subprocess.CompletedProcess:
    command = ["bash", str(SCRIPT), "--output_dir", str(out), *ARGS]
    return subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def logged_steps(out: Path) -> int:
    log = out / "log.jsonl"
    return sum(1 for line in log.read_text().splitlines() if '"split": "train"' in line) if log.exists() else 0


def node_of(process: psutil.Process) -> str | None:
    with contextlib.suppress(psutil.NoSuchProcess):
        return process.environ().get("SLURM_NODEID")
    return None


def test_two_nodes_form_one_world_and_train(tmp_path):
    out = tmp_path / "run"
    job = sbatch(job_env(tmp_path), out)
    assert job.returncode == 0, job.stdout[-6000:]
    for node in (0, 1):
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in job.stdout
    assert "world 2," in job.stdout
    losses = train_losses(out)
    assert len(losses) >= 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    assert json.loads((out / "metrics.json").read_text())["num_prompts"] == 48


def test_preempted_job_saves_requeues_and_resumes_exactly(tmp_path):
    """USR1 to the batch shell mid-run (Slurm's warning): a complete checkpoint at the step it stopped at, exit 75,
    requeue; the requeued job resumes there and ends as a run never interrupted (one node × 2 ranks, fp32)."""
    launch(2, tmp_path / "whole", *ARGS)
    whole = train_losses(tmp_path / "whole")

    out = tmp_path / "run"
    env = job_env(tmp_path)
    command = ["bash", str(SCRIPT), "--output_dir", str(out), *ARGS]
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while logged_steps(out) < 3 and job.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(job.pid, signal.SIGUSR1)
        log, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, log[-6000:]
    assert (tmp_path / "submit" / "requeued").read_text() == "1234\n"  # the run exited 75
    stopped = int(re.search(r"stopped at step (\d+) on request", log)[1])
    assert 3 <= stopped < len(whole)
    assert checkpoint.read_meta(checkpoint.complete_checkpoints(out)[-1])["step"] == stopped
    assert not (out / "metrics.json").exists() and not (out / "PREEMPT").exists()

    requeued = sbatch({**env, "SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(free_port())}, out)
    assert requeued.returncode == 0, requeued.stdout[-6000:]
    assert re.search(rf"resumed from \S+step-0*{stopped} at step {stopped}: {stopped} of ", requeued.stdout)
    assert train_losses(out) == pytest.approx(whole, abs=1e-6)
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(
        json.loads((tmp_path / "whole" / "metrics.json").read_text()), abs=1e-6
    )


def test_a_dead_node_fails_the_job_clearly(tmp_path):
    """Every process of node 1 killed mid-run: node 0's rank fails on the broken connection, the job ends with an
    error (no requeue), and the checkpoints it completed are there for `sbatch` again to resume from."""
    out = tmp_path / "run"
    command = ["bash", str(SCRIPT), "--output_dir", str(out), *ARGS, "--save_every", "2"]
    job = subprocess.Popen(command, env=job_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while logged_steps(out) < 5 and job.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        node1 = [p for p in psutil.Process(job.pid).children(recursive=True) if node_of(p) == "1"]
        assert node1, "node 1 has no processes"
        for process in node1:
            process.kill()
        killed = time.time()
        log, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode not in (0, 75), log[-6000:]
    assert time.time() - killed < 60
    assert "Connection reset by peer" in log or "Connection closed by peer" in log
    assert not (tmp_path / "submit" / "requeued").exists() and not (out / "metrics.json").exists()
    assert checkpoint.resolve_resume("auto", out) is not None
