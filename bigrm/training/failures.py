"""The first failure of a run on several ranks: the one line that every rank's exit reports.

When one rank fails, the others fail as a consequence: the launcher ends them (deepspeed's sends SIGTERM once a rank
exits non-zero), or their next collective does (gloo: the peer closed the connection; NCCL: a timeout). Which of
them prints is a race, and a run once ended with only `stopped by SIGTERM` while the data error that caused it, met
on the other rank, was lost. So a failing rank first claims a record (atomically: the first claim wins) holding its
one line and exit code, before it leaves the process group; the claimant prints its line, and a rank that finds
another's claim exits with that code and prints nothing more.

The record is per node, shared by the ranks of one launcher: a file in /dev/shm (or the temp dir) named by the
launcher's pid and the rendezvous port, trusted only when written after that launcher started. On several nodes,
each node reports the first failure it saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bigrm import dist
from bigrm.errors import BigrmError
from bigrm.training.preemption import Terminated

_mine: tuple[str, int, bool, bool] | None = None  # this process's failure, once noted: describe(err) + claimed first
STALE_S = 86400  # records of runs older than this are removed by the next failing run's claim


def _shared() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def record_path() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"bigrm-failure-{os.getuid()}-{os.getppid()}-{os.environ.get('MASTER_PORT', '')}.json"


def _launcher_started() -> float:
    import psutil  # deepspeed's dependency

    try:
        return psutil.Process(os.getppid()).create_time()
    except psutil.Error:
        return time.time() - STALE_S


def _recorded(path: Path) -> dict | None:
    """The claim in `path`, or None when there is none or it is older than this run."""
    try:
        if path.stat().st_mtime < _launcher_started():
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _claim(line: str, code: int) -> bool:
    """Record (line, code) unless another rank's failure is recorded: whether this one is the first."""
    path = record_path()
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"line": line, "code": code, "rank": dist.launched_rank()}))
        if path.exists() and _recorded(path) is None:  # an earlier run's
            path.unlink(missing_ok=True)
        _prune(path.parent)
        os.link(tmp, path)  # fails if it exists: the first claim wins
        return True
    except FileExistsError:
        return False
    except OSError:  # nowhere to record it: say it here
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _prune(directory: Path) -> None:
    for old in directory.glob(f"bigrm-failure-{os.getuid()}-*.json"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < time.time() - STALE_S:
                old.unlink()


def describe(err: BaseException) -> tuple[str, int, bool]:
    """(one line, exit code, whether it is a bug whose traceback is shown)."""
    if isinstance(err, BigrmError):
        return f"error: {err}", 2, False
    if isinstance(err, Terminated):
        return err.line(), 128 + err.signum, False
    gone = dist.peer_gone(err)
    if gone:  # not this rank's failure: one line instead of a traceback through DeepSpeed's collectives
        return f"rank {dist.launched_rank()} stopped: another rank went away (gloo: {gone})", 1, False
    first = (str(err).splitlines() or [""])[0]
    return f"error: rank {dist.launched_rank()} failed: {type(err).__name__}: {first} (traceback above)", 1, True


def note(err: BaseException) -> None:
    """Claim err as the run's first failure, if no rank's is recorded yet; called before the process group is
    left, so that a rank that sees this one go finds why. Only the first call of a process counts."""
    global _mine
    if _mine is None:
        line, code, bug = describe(err)
        _mine = (line, code, bug, _claim(line, code) if _shared() else True)


def report(err: BaseException) -> int:
    """The exit code of a rank that failed with err: its own line printed when its failure was the first (a bug
    re-raised, for its traceback), the first failure's code otherwise. Ends what note() began."""
    global _mine
    note(err)
    (line, code, bug, first), _mine = _mine, None
    if not first:
        recorded = _recorded(record_path())
        return recorded["code"] if recorded else code
    if bug:
        raise err
    print(line, file=sys.stderr, flush=True)
    return code
