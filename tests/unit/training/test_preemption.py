"""Requests to save and stop, on one process (the all_reduce that shares them is exercised in test_multinode.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from bigrm.training import preemption
from tests.helpers.paths import REPO


@pytest.fixture
def stop(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    yield preemption.StopRequest(tmp_path, torch.device("cpu"))
    signal.signal(signal.SIGUSR1, previous)


def test_sigusr1_asks_to_stop(stop):
    assert not stop.requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.requested()


def test_the_request_file_asks_to_stop_until_consumed(stop, tmp_path):
    assert stop.file == tmp_path / "PREEMPT"
    stop.file.touch()
    assert stop.requested()
    stop.consume()
    assert not stop.file.exists() and not stop.requested()


def test_the_request_file_of_a_configured_run():
    """What slurm/train.sbatch asks: the trainer's own config loader places it, overrides included."""
    where = [sys.executable, "-m", "bigrm.training.preemption", "--config", "bigrm/recipes/llama-7b.yaml"]
    assert subprocess.check_output(where, cwd=REPO, text=True) == "outputs/llama-7b-rm/PREEMPT\n"
    assert subprocess.check_output([*where, "--output_dir", "/runs/a"], cwd=REPO, text=True) == "/runs/a/PREEMPT\n"


def test_a_second_signal_does_not_break_the_cleanup_of_the_first():
    """deepspeed's launcher follows a Ctrl-C with SIGTERM to every rank: a traceback from inside the cleanup of the
    first, before this."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        preemption.terminate_on_signals()
        with pytest.raises(preemption.Terminated) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 1)  # the handler runs before this returns
        assert stopped.value.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the run is already stopping
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
