"""Scoring a LoRA or exported model on a file through `bigrm score`."""

from __future__ import annotations

import json

import numpy as np

from bigrm import cli


def score(model, data, out) -> np.ndarray:
    assert cli.score_main(["--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    return np.concatenate([json.loads(line)["rewards"] for line in out.read_text().splitlines()])
