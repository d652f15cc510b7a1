"""slurm/train.sbatch run by bash with stand-ins for Slurm: `scontrol` names the allocation's hosts and records
requeues, `srun` starts its command once per node with that node's SLURM_NODEID, `deepspeed` prints its arguments."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.helpers.slurm import RECIPE, SCRIPT, fake_slurm


def sbatch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)


def test_one_launcher_per_node_with_the_first_host_as_master(tmp_path):
    env = fake_slurm(tmp_path, ["gpu-a07", "gpu-b03"], gpus=4, SLURM_CPUS_PER_TASK="16")
    proc = sbatch(env, "--lr", "5e-6")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == [
        f"deepspeed --hostfile logs/hostfile-1234 --no_ssh --node_rank {node} --master_addr gpu-a07 "
        f"--master_port 29734 launch/train.py --config {RECIPE} --resume auto --lr 5e-6"
        for node in (0, 1)
    ]  # port 29500 + job id % 1000; --resume auto first, so that the user's own --resume wins
    assert "srun --nodes=2 --ntasks-per-node=1 --wait=60 --cpus-per-task=16 bash -c" in proc.stderr
    submit = tmp_path / "submit"
    assert (submit / "logs" / "hostfile-1234").read_text() == "gpu-a07 slots=4\ngpu-b03 slots=4\n"
    assert not (submit / "requeued").exists()

    proc = sbatch({**env, "MASTER_PORT": "31111"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--master_port 31111 ") == 2


def test_the_job_asks_for_a_warning_and_may_be_requeued():
    header = [line.split()[1] for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert {"--signal=B:USR1@600", "--requeue", "--open-mode=append", "--output=logs/%x-%j.out"} <= set(header)


@pytest.mark.parametrize(("status", "requeued"), [(0, False), (1, False), (75, True)])
def test_only_a_run_stopped_with_a_checkpoint_is_requeued(tmp_path, status, requeued):
    proc = sbatch(fake_slurm(tmp_path, ["n1", "n2"], gpus=8, EXIT_STATUS=str(status)))
    assert proc.returncode == (0 if requeued else status), proc.stderr
    assert (tmp_path / "submit" / "requeued").exists() == requeued
    if requeued:
        assert (tmp_path / "submit" / "requeued").read_text() == "1234\n"


def test_usr1_to_the_batch_shell_asks_the_run_to_stop(tmp_path):
    """Slurm's warning (B:USR1) reaches only the batch shell: it leaves the request file in output_dir, which the
    (stand-in) run answers by exiting 75, and the job requeues itself. A request left by an earlier job is dropped."""
    out = tmp_path / "run"
    out.mkdir()
    request = out / "PREEMPT"
    request.touch()
    env = fake_slurm(tmp_path, ["n1", "n2"], gpus=8, RUN_UNTIL_ASKED=str(request))
    job = subprocess.Popen(["bash", str(SCRIPT), "--output_dir", str(out)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        submit = tmp_path / "submit"
        deadline = time.time() + 60
        while not all((submit / f"running-{n}").exists() for n in (0, 1)) and time.time() < deadline:
            time.sleep(0.05)
        assert job.poll() is None, job.communicate()
        os.kill(job.pid, signal.SIGUSR1)
        stdout, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, stderr
    assert "asking the run to save a checkpoint and stop" in stdout
    assert "requeueing job 1234" in stdout
    assert (submit / "requeued").read_text() == "1234\n"
