"""Launching real training runs (1 process, or DeepSpeed ranks on the CPU) and reading what they logged."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from tests.helpers.paths import REPO

SMALL = [
    "--data.synthetic.num_train", "240", "--data.synthetic.num_eval", "48", "--epochs", "1",
    "--max_tokens_per_batch", "400", "--log_every", "1", "--eval_every", "0", "--report_to", "none",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(ranks: int, out: Path, *args: str) -> list[str]:
    script = [str(REPO / "launch" / "train.py"), "--output_dir", str(out), *args]
    if ranks == 1:
        return [sys.executable, *script]
    runner = Path(sys.executable).parent / "deepspeed"
    return [str(runner), "--num_gpus", str(ranks), "--master_port", str(free_port()), *script]


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def launch(ranks: int, out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(ranks, out, *args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def train_losses(out: Path) -> list[float]:
    """The loss of every step, in step order; a step logged twice (before a kill, then after resume) keeps its last."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    return [by_step[s] for s in sorted(by_step)]


def rewards_with_plain_transformers(model_dir: Path, groups) -> list[list[float]]:
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [[model(input_ids=torch.from_numpy(s)[None]).logits[0, 0].item() for s in g.seqs] for g in groups]
