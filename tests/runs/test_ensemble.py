"""A short ensemble run (one process): trains M LoRA members on the noisy-label task, logs and evaluates each, exports
them as plain classifiers that `bigrm score` reads back as the trained ensemble."""

from __future__ import annotations

import json

import pytest

from bigrm import cli
from tests.helpers.runs import launch

RUN = [
    "--data.synthetic.task", "noisy", "--data.synthetic.num_train", "64", "--data.synthetic.num_eval", "16",
    "--epochs", "1", "--max_tokens_per_batch", "400", "--log_every", "1", "--eval_every", "0", "--report_to", "none",
    "--lora.r", "4", "--lora.alpha", "8", "--lr", "3e-3", "--loss.ensemble", "2", "--save_every", "0",
]  # fmt: skip


@pytest.mark.slow
def test_an_ensemble_trains_evaluates_exports_and_scores(tmp_path):
    out = tmp_path / "run"
    launch(1, out, *RUN)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train and all("members_loss" in r and "member_1_accuracy" in r for r in train)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"member_0_accuracy", "member_1_accuracy", "ensemble_mean_accuracy", "spread_auroc"} <= metrics.keys()
    final = out / "final"
    assert (final / "member_0" / "model.safetensors").is_file() and (final / "member_1" / "model.safetensors").is_file()
    scored = tmp_path / "scored.jsonl"
    data = out / "synthetic-eval.jsonl"
    assert cli.score_main(["--model", str(final), "--data", str(data), "--out", str(scored)]) == 0
    row = json.loads(scored.read_text().splitlines()[0])
    ensemble = row["ensemble"]
    assert len(ensemble["members"]) == 2 and len(ensemble["members"][0]) == 2  # per completion, each member
    assert row["rewards"] == pytest.approx(ensemble["mean"], abs=1e-6)
    assert ensemble["conservative"] == pytest.approx(
        [m - s for m, s in zip(ensemble["mean"], ensemble["std"], strict=True)]
    )
