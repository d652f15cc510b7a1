"""Stepwise (PRM) rows written to files, and the run options of the PRM tests."""

from __future__ import annotations

import json
import random
from pathlib import Path


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ARGS = ["--max_tokens_per_batch", "300", "--lr", "3e-3", "--data.max_length", "64", "--epochs", "3",
        "--log_every", "10", "--report_to", "none", "--share_prompt", "true"]  # fmt: skip


def natural_rows(n: int, seed: int = 0) -> list[dict]:
    """Sums of small numbers, two solutions per prompt: steps like "2 + 1 = 3." and "Step 2: 1 + 1 = 2", prompts
    ending in "." (BPE merges ".\\n" and ".Step" across the boundaries of the joined text)."""
    rng, rows = random.Random(seed), []
    for p in range(n // 2):  # distinct prompts: a prompt's two rows are consecutive
        prompt = f"Add {p + 1} and the numbers after it."
        for _ in range(2):
            total, steps = rng.randint(1, 9), []
            for k in range(rng.randint(1, 4)):
                a = rng.randint(1, 9)
                steps.append(
                    f"{total} + {a} = {total + a}."
                    if rng.random() < 0.5
                    else f"Step {k + 1}: {total} + {a} = {total + a}"
                )
                total += a
            rows.append({"prompt": prompt, "completions": steps, "labels": [rng.random() < 0.7 for _ in steps]})
    return rows  # fmt: skip
