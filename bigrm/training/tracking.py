"""Rank-0 logging: console lines, the training progress bar, <output_dir>/log.jsonl, and every row fanned out to the
sinks of train.report_to (bigrm.training.sinks)."""

from __future__ import annotations

import json
from pathlib import Path

from bigrm import dist, progress


class Tracker:
    def __init__(self, out_dir: Path, total_steps: int, sinks: list):
        """sinks: rank 0's bigrm.training.sinks (closed with the tracker); other ranks pass none."""
        self.main = dist.is_main()
        self.bar = progress.bar(total_steps, "train", unit="step")
        self.sinks = sinks
        self.jsonl = open(out_dir / "log.jsonl", "a") if self.main else None  # closed in close()

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
            # the run's accuracy: ranked pairs', else steps' (a stepwise-only run); none for rated rows alone
            acc = values.get("pairwise_accuracy", values.get("step_accuracy"))
            shown = {"loss": values.get("loss"), "acc": acc}
            self.bar.set_postfix(
                **{k: f"{v:.4f}" if k == "loss" else f"{v:.3f}" for k, v in shown.items() if v is not None}
            )
        self.jsonl.write(json.dumps({"split": prefix, "step": step, **values}) + "\n")
        self.jsonl.flush()
        for sink in self.sinks:
            sink.log(prefix, values, step)

    def record(self, kind: str, values: dict) -> None:
        """A log.jsonl row that is not a metric series (the run's setup): no console line, no scalar series."""
        if self.main:
            self.jsonl.write(json.dumps({"split": kind, **values}) + "\n")
            self.jsonl.flush()
            for sink in self.sinks:
                sink.record(kind, values)

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
        for sink in self.sinks:
            sink.close()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
