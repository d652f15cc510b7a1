"""Stepwise (PRM) rows written to files, and the run options of the PRM tests."""

from __future__ import annotations

import json
from pathlib import Path


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ARGS = ["--max_tokens_per_batch", "300", "--lr", "3e-3", "--data.max_length", "64", "--epochs", "3",
        "--log_every", "10", "--report_to", "none", "--share_prompt", "true"]  # fmt: skip
