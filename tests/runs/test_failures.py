"""Runs that fail after the process group exists, on 2 CPU ranks: every rank ends (no hang), the exit code is not 0,
the error is reported once, the other ranks print no traceback, and no shared-memory buffer is left in /dev/shm.

Faults are injected by a small launch script that patches one function, then runs `bigrm train` as
launch/train.py does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import chain
from pathlib import Path

import pytest

from bigrm import console
from tests.helpers.paths import REPO
from tests.helpers.runs import ENV, SMALL, free_port

pytestmark = pytest.mark.slow
ARGS = [*SMALL, "--max_steps", "2", "--data.synthetic.num_train", "120", "--data.synthetic.num_eval", "16"]
FAULTS = {
    "none": "",
    # the export differs from the trained model: rank 0 finds it, every rank raises ExportError
    "export": "from bigrm.kinds import RewardKind\n"
    "real = RewardKind.plain_rewards\nRewardKind.plain_rewards = lambda *a: real(*a) + 1",
    # rank 1 alone fails inside its second micro-batch, while rank 0 waits in a collective
    "step": """
import torch.distributed as td
from bigrm.kinds import RewardKind
real, calls = RewardKind.loss, []
def failing(*args, **kwargs):
    calls.append(1)
    if td.get_rank() == 1 and len(calls) == 2:
        raise RuntimeError("injected failure on rank 1")
    return real(*args, **kwargs)
RewardKind.loss = failing
""",
    # rank 1 alone meets a data error at once, rank 0 is still loading when the launcher ends it (SIGTERM)
    "data": """
import time
import torch.distributed as td
from bigrm.data import pipeline
from bigrm.errors import DataError
real = pipeline.load
def load(*args):
    if td.get_rank() == 1:
        raise DataError("injected: a data error on rank 1 only")
    time.sleep(120)
    return real(*args)
pipeline.load = load
""",
}


def fail(tmp_path: Path, fault: str, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    script = tmp_path / "launch_with_fault.py"
    script.write_text(f"import sys\n{FAULTS[fault]}\nfrom bigrm.cli import train_main\nsys.exit(train_main())\n")
    port = free_port()
    runner = Path(sys.executable).parent / "deepspeed"
    cmd = [str(runner), "--num_gpus", "2", "--master_port", str(port), str(script), "--output_dir",
           str(tmp_path / "run"), *ARGS, *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "shared memory left behind"
    return proc, port


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]


def test_bad_resume_checkpoint_stops_every_rank_once(tmp_path):
    """A checkpoint written by another number of ranks: refused after the engine exists, one line, exit 2."""
    ckpt = tmp_path / "old" / "step-00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "complete.json").write_text(json.dumps({"step": 1, "world": 1, "zero_stage": 3, "files": {}}))
    proc, _ = fail(tmp_path, "none", "--resume", str(ckpt))
    assert errors(proc) == [f"error: {ckpt} was written by 1 ranks; resume it with the same number (2 now)"]
    assert "Traceback" not in proc.stderr and "exits with return code = 2" in proc.stdout


def test_failed_export_verification_stops_every_rank_once(tmp_path):
    proc, _ = fail(tmp_path, "export")
    assert len(errors(proc)) == 1 and "does not reproduce the trained model" in errors(proc)[0]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "metrics.json").exists()  # the run itself finished


def test_failure_inside_a_step_on_one_rank_ends_the_others_quietly(tmp_path):
    proc, _ = fail(tmp_path, "step")
    assert proc.stderr.count("Traceback") == 1 and "RuntimeError: injected failure on rank 1" in proc.stderr
    assert "[rank0]" not in proc.stderr  # rank 0 only says that another rank failed, if it gets to say anything


def test_the_first_error_of_any_rank_is_the_runs_one_line(tmp_path):
    """Rank 1 fails first; rank 0, ended by the launcher because of it, must not report its SIGTERM instead."""
    proc, _ = fail(tmp_path, "data")
    assert errors(proc) == ["error: injected: a data error on rank 1 only"]
    assert "SIGTERM" not in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert "exits with return code = 2" in proc.stdout


@pytest.mark.parametrize("ranks", [1, 2])
def test_ctrl_c_stops_with_one_line_exit_130_and_no_torn_checkpoint(tmp_path, ranks):
    """SIGINT to the whole job, as a terminal's Ctrl-C sends it. Under deepspeed's launcher, which answers it with
    SIGTERM to every rank (and SIGKILL 30 s later), this used to end in tracebacks from inside the ranks' cleanup and
    left their /dev/shm buffers behind. The ranks' console also holds none of the library lines bigrm silences."""
    import os
    import signal
    import time

    port, out = free_port(), tmp_path / "run"
    script = [str(REPO / "launch" / "train.py"), "--output_dir", str(out), *ARGS, "--max_steps", "40"]
    script += ["--save_every", "1"]
    runner = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)]
    cmd = [*runner, *script] if ranks == 2 else [sys.executable, *script]
    printed = tmp_path / "console.txt"
    with printed.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, start_new_session=True, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline and '"split": "train"' not in _read(out / "log.jsonl"):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be signalled"
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=90)
    time.sleep(1)  # the ranks themselves may outlive the launcher for a moment
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "shared memory left behind"
    text = printed.read_text()
    said = [line for line in text.splitlines() if line.startswith("interrupted (SIGINT): ")]
    steps = sorted((out / "checkpoints").glob("step-*"))
    assert all((step / "complete.json").exists() for step in steps), "a torn checkpoint left behind"
    where = f"continue from the last complete checkpoint ({steps[-1]}) with --resume auto" if steps else "no complete"
    assert len(said) == 1 and where in said[0], text[-3000:]
    assert "Exception ignored" not in text and "Terminated" not in text
    # deepspeed's runner (its own code, no handler) prints its KeyboardInterrupt; no other traceback
    assert text.count("Traceback") == (ranks == 2) and (ranks == 1 or "deepspeed/launcher/runner.py" in text)
    assert code == (130 if ranks == 1 else -signal.SIGINT)  # the runner ends by the signal: the shell's 130 too
    ranks_said = text.split("spawned with command")[-1]  # after the deepspeed launcher's own lines
    silenced = [words for words in (*chain(*console.QUIET.values()), console.BUILT) if words in ranks_said]
    assert not silenced and "on the CPU (no GPU found)" in ranks_said


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
