"""Where rank 0's scalars go besides log.jsonl (`train.report_to`): TensorBoard and Weights & Biases.

A sink takes `log(prefix, values, step)` (a metric series: `train`, `eval`), `record(kind, values)` (the run's
setup, once) and `close()`. bigrm.training.tracking fans every row out to the open sinks.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from bigrm.errors import ConfigError

WANDB_ID_FILE = "wandb_run_id"  # in output_dir: the W&B run a resumed run continues
STEP_METRIC = "train/global_step"  # the x axis of every W&B chart, as transformers names it


def check_installed(report_to: list[str]) -> None:
    """Before any work: a tracker asked for must be importable."""
    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "train.report_to: wandb is not installed (pip install 'bigrm[wandb]' or pip install wandb), "
            "or drop it from report_to"
        )


class TensorBoard:
    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory))

    def log(self, prefix: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def record(self, kind: str, values: dict) -> None:
        self.writer.add_text(kind, json.dumps(values))

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per output_dir and start; a resumed run (`resumed`) continues the run whose id is kept there."""

    def __init__(self, out_dir: Path, run_name: str, config: dict, resumed: bool):
        import wandb

        id_file = out_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else None  # None: a new run
        # WANDB_ENTITY, WANDB_MODE and the rest are read by wandb itself
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "bigrm"),
            name=run_name or str(out_dir),
            id=run_id,
            resume="allow",
            dir=os.environ.get("WANDB_DIR", str(out_dir)),
            config=config,
        )
        id_file.write_text(self.run.id + "\n")
        # a resumed run logs the steps after its checkpoint again: charts keyed by the step, not by W&B's own counter
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)

    def log(self, prefix: str, values: dict[str, float], step: int) -> None:
        self.run.log({**{f"{prefix}/{k}": v for k, v in values.items()}, STEP_METRIC: step})

    def record(self, kind: str, values: dict) -> None:
        self.run.config.update({kind: values}, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


def open_sinks(report_to: list[str], out_dir: Path, run_name: str, config: dict, resumed: bool) -> list:
    """Rank 0's sinks for train.report_to (other ranks open none)."""
    sinks: list = []
    if "tensorboard" in report_to:
        sinks.append(TensorBoard(out_dir / "tensorboard"))
    if "wandb" in report_to:
        sinks.append(WandB(out_dir, run_name, config, resumed))
    return sinks
