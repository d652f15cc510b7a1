"""Requests to save and stop, turned into one decision that every rank takes at the same step boundary.

Two ways to ask, for two situations:
- SIGUSR1 to any training rank: a single `python launch/train.py`, or ranks a user signals directly;
- the file <output_dir>/PREEMPT: what `slurm/train.sbatch` creates when Slurm warns its batch shell
  (`--signal=B:USR1@...`) before the time limit.
Slurm could signal the job steps instead, but there the first processes hit are the deepspeed launchers (its runner
and `deepspeed.launcher.launch`), which leave SIGUSR1 at its default action: they die and orphan the ranks. A file
needs no forwarding through launchers or across nodes, and the batch shell runs on the allocation's first node,
where rank 0 runs.

The trainer then saves a complete checkpoint and exits with EXIT_CODE; `--resume auto` continues from it.
`python -m bigrm.training.preemption [--config FILE] [--key value ...]` prints where the request file of that run goes.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from bigrm import dist, options

EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped with a complete checkpoint, run again to continue


class Preempted(Exception):
    """Raised once the checkpoint is complete and the process group is left."""


class Terminated(Exception):
    """SIGTERM or SIGINT: the run stops where it is, through train.run's `finally` (log closed, process group left),
    without saving; `--resume auto` continues from the last complete checkpoint, which run() sets."""

    def __init__(self, signum: int, checkpoint: Path | None = None):
        super().__init__(signum, checkpoint)
        self.signum, self.checkpoint = signum, checkpoint

    def line(self) -> str:
        name = signal.Signals(self.signum).name
        said = f"interrupted ({name})" if self.signum == signal.SIGINT else f"stopped by {name}"
        if self.checkpoint is None:
            return f"{said}: no complete checkpoint was saved, a rerun starts from the beginning"
        return f"{said}: continue from the last complete checkpoint ({self.checkpoint}) with --resume auto"


def _stopping(signum, frame) -> None:
    pass


def terminate_on_signals() -> None:
    def stop(signum, frame) -> None:
        # the run is already stopping: a second signal (deepspeed's launcher follows a Ctrl-C with SIGTERM) must
        # not break its cleanup with another traceback; the launcher's SIGKILL still ends a cleanup that hangs.
        # A handler, not SIG_IGN: Python reports a signal already pending when its handler became SIG_IGN
        signal.signal(signal.SIGTERM, _stopping)
        signal.signal(signal.SIGINT, _stopping)
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def request_file(output_dir: str | Path) -> Path:
    return Path(output_dir) / "PREEMPT"


class StopRequest:
    def __init__(self, output_dir: Path, device: torch.device):
        self.file = request_file(output_dir)
        self.device = device
        self.signalled = False
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True  # acted on at the next step boundary: a save mid-step would be inconsistent

    def requested(self) -> bool:
        """Collective. One all_reduce, so that every rank decides the same: a save that only some ranks enter never
        returns. Only rank 0 looks for the file: one stat per step on the shared filesystem rather than one per rank."""
        asked = self.signalled or (dist.is_main() and self.file.exists())
        return dist.all_sum(torch.tensor([float(asked)], dtype=torch.float64, device=self.device)).item() > 0

    def consume(self) -> None:
        """The request is honoured: a rerun in the same output_dir must not stop again after its first step."""
        if dist.is_main():
            self.file.unlink(missing_ok=True)


if __name__ == "__main__":
    print(request_file(options.from_argv().train.output_dir))
