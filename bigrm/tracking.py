"""Rank-0 logging: console lines, a progress bar, <output_dir>/log.jsonl and TensorBoard scalars."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from bigrm import dist


class Tracker:
    def __init__(self, out_dir: Path, total_steps: int, tensorboard: bool):
        self.main = dist.is_main()
        # in a batch log (no terminal) a redraw every 30 s instead of several a second
        interval = 0.1 if sys.stderr.isatty() else 30.0
        self.bar = tqdm(
            total=total_steps, desc="train", dynamic_ncols=True, disable=not self.main, mininterval=interval
        )
        self.writer = None
        self.jsonl = open(out_dir / "log.jsonl", "a") if self.main else None  # closed in close()
        if self.main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def print(self, text: str) -> None:
        if self.main:
            self.bar.write(text)

    def step(self) -> None:
        self.bar.update(1)

    def log(self, prefix: str, values: dict[str, float], step: int) -> None:
        if not self.main:
            return
        self.bar.write(f"[{prefix} step {step}] " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
        if prefix == "train":
            acc = values.get("pairwise_accuracy", values.get("step_accuracy", 0.0))  # stepwise-only runs: step accuracy
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{acc:.3f}")
        self.jsonl.write(json.dumps({"split": prefix, "step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()

    def record(self, kind: str, values: dict) -> None:
        """A log.jsonl row that is not a metric series (the run's setup): no console line, no TensorBoard scalar."""
        if self.main:
            self.jsonl.write(json.dumps({"split": kind, **values}) + "\n")
            self.jsonl.flush()

    def drop_after(self, step: int) -> None:
        """A resumed run retakes the steps after its checkpoint: the rows an interrupted run logged for them go, so
        log.jsonl holds each step once."""
        if not self.main:
            return
        path = Path(self.jsonl.name)
        self.jsonl.close()
        rows = path.read_text().splitlines()
        path.write_text("".join(r + "\n" for r in rows if json.loads(r).get("step", 0) <= step))
        self.jsonl = open(path, "a")  # closed in close()

    def close(self) -> None:
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
