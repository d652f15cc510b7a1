"""The first failure of a run's ranks is the one line every rank's exit reports (the ranks simulated in one process:
they share the launcher, whose pid names the record; the 2-rank race is in tests/runs/test_failures.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from bigrm.errors import DataError
from bigrm.training import failures
from bigrm.training.preemption import Terminated


@pytest.fixture
def world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", f"test-failures-{os.getpid()}")

    def rank(r: int) -> None:
        monkeypatch.setenv("RANK", str(r))

    yield rank
    failures.record_path().unlink(missing_ok=True)


def test_the_first_error_is_the_line_and_the_code_a_rank_torn_down_after_it_exits_with(world, capsys):
    world(1)
    assert failures.report(DataError("data.jsonl:line 3: too long")) == 2
    assert capsys.readouterr().err == "error: data.jsonl:line 3: too long\n"
    world(0)  # the launcher's SIGTERM, then the SIGINT a user adds: consequences, said by nobody
    assert failures.report(Terminated(signal.SIGTERM)) == 2
    assert failures.report(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")) == 2
    assert capsys.readouterr().err == ""


def test_a_consequence_with_no_error_before_it_says_what_it_is(world, capsys):
    world(0)
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    assert failures.report(gone) == 1
    assert capsys.readouterr().err == "rank 0 stopped: another rank went away (gloo: Connection closed by peer)\n"


def test_a_bug_keeps_its_traceback_once(world, capsys):
    world(1)
    with pytest.raises(ZeroDivisionError):
        failures.report(ZeroDivisionError("division by zero"))
    world(0)
    assert failures.report(ZeroDivisionError("division by zero")) == 1  # the same bug on the other rank: quiet
    assert capsys.readouterr().err == ""


def test_an_earlier_runs_record_is_not_this_runs(world, capsys):
    world(1)
    path = failures.record_path()
    path.write_text('{"line": "error: old", "code": 2, "rank": 1}')
    old = time.time() - 10 * failures.STALE_S
    os.utime(path, (old, old))
    assert failures.report(Terminated(signal.SIGINT)) == 130
    assert capsys.readouterr().err.startswith("interrupted (SIGINT): ")


def test_one_process_prints_every_failure(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for _ in range(2):
        assert failures.report(DataError("bad")) == 2
        assert capsys.readouterr().err == "error: bad\n"


def test_a_stop_by_signal_says_where_to_continue_from():
    step = Path("out/checkpoints/step-00000004")
    assert Terminated(signal.SIGINT, step).line() == (
        f"interrupted (SIGINT): continue from the last complete checkpoint ({step}) with --resume auto"
    )
    assert Terminated(signal.SIGTERM).line() == (
        "stopped by SIGTERM: no complete checkpoint was saved, a rerun starts from the beginning"
    )
