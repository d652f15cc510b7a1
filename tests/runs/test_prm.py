"""Process reward models: stepwise rows through tokenisation, the token store and packing, read at every step end
exactly as a plain transformers forward of each sequence alone; the token-classifier export; 2-rank ZeRO-3 runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from bigrm import cli
from bigrm.builtin.synthetic import make_rows, make_step_rows
from bigrm.kinds.steps import SEPARATOR_KEY
from tests.helpers.runs import launch
from tests.helpers.steps import ARGS, write


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prm") / "run"
    launch(2, out, "--data.synthetic.task", "steps", "--data.synthetic.num_train", "600",
           "--data.synthetic.num_eval", "100", *ARGS)  # fmt: skip
    return out


@pytest.mark.slow
def test_synthetic_step_task_trains_and_exports_a_token_classifier(synthetic_run, tmp_path):
    out = synthetic_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step_accuracy"] >= 0.95 and metrics["num_solutions"] == 100
    assert "pairwise_accuracy" not in metrics  # nothing was ranked
    assert not (out / "eval_report").exists()  # nor drawn
    config = json.loads((out / "final" / "config.json").read_text())
    assert config[SEPARATOR_KEY] == "\n" and config["architectures"] == ["LlamaForTokenClassification"]

    # bigrm score's step rewards are what the export gives, re-loaded with plain transformers, at the separators
    data = out / "synthetic-eval.jsonl"
    assert cli.score_main(["--model", str(out / "final"), "--data", str(data), "--out", str(tmp_path / "s.jsonl"),
                           "--data.max_length", "64"]) == 0  # fmt: skip
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForTokenClassification.from_pretrained(out / "final").eval()
    newline = tok.convert_tokens_to_ids("Ċ")
    worst = 0.0
    for row in scored[:20]:
        ids = tok(row["prompt"] + "".join(s + "\n" for s in row["completions"]), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            probs = model(input_ids=ids).logits[0].softmax(-1)[:, 1]
        at_separators = probs[ids[0] == newline].tolist()
        assert len(at_separators) == len(row["labels"]) == len(row["step_rewards"][0])
        worst = max(worst, max(abs(a - b) for a, b in zip(at_separators, row["step_rewards"][0], strict=True)))
    assert worst < 1e-4

    # bigrm eval on the export reproduces the trainer's eval
    assert cli.eval_main(["--model", str(out / "final"), "--data", str(data), "--out", str(tmp_path / "e.json"),
                          "--data.max_length", "64"]) == 0  # fmt: skip
    evaluated = json.loads((tmp_path / "e.json").read_text())
    for key in ("step_accuracy", "step_auroc", "step_error_f1", "first_error_f1", "num_steps"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-9), key

    # bigrm export of the ZeRO-3 checkpoint writes the same token classifier, verified
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert cli.export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "exported")]) == 0
    again = AutoModelForTokenClassification.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.slow
def test_mixed_stepwise_and_ranked_files_reach_both_targets(tmp_path):
    files = {
        name: write(tmp_path / f"{name}.jsonl", rows)
        for name, rows in (
            ("steps", make_step_rows(600, 2, 3, 0)),
            ("steps_eval", make_step_rows(100, 2, 3, 1)),
            ("ranked", make_rows(300, 2, 4, 0)),
            ("ranked_eval", make_rows(60, 2, 4, 1)),
        )
    }
    out = tmp_path / "run"
    launch(2, out, "--data.train_files", f"[{files['steps']},{files['ranked']}]",
           "--data.eval_files", f"[{files['steps_eval']},{files['ranked_eval']}]", *ARGS)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step_accuracy"] >= 0.95 and metrics["num_solutions"] == 100
    assert metrics["pairwise_accuracy"] > 0.6 and metrics["num_prompts"] == 60
    drawn = json.loads((out / "eval_report" / "report.json").read_text())  # the ranked prompts alone
    assert list(drawn["accuracy"]["prompts_by_subset"].values()) == [60]
