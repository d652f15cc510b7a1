"""Multi-attribute reward heads: the loss against a Python loop (masked ratings, fp64, gradients), the merged 1-logit
export against the N-head export, LoRA/QLoRA with N heads, and one 2-rank ZeRO-3 run on the synthetic task whose
eval, export, merge, score and eval are all checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from bigrm import cli
from bigrm.model.heads import AttributeHead
from tests.helpers.attributes import NAMES, WEIGHTS, plain_logits

RUN = [
    "--data.synthetic.task", "attributes", "--data.attributes", "[helpfulness, correctness, verbosity]",
    "--loss.attribute_weights", json.dumps(WEIGHTS), "--data.synthetic.num_train", "300",
    "--data.synthetic.num_eval", "60", "--epochs", "8", "--max_tokens_per_batch", "400", "--log_every", "20",
    "--eval_every", "0", "--report_to", "none",
    # tokenise in the builder itself: forked pool workers inherit the trainer's SIGTERM handler
    # (bigrm.training.preemption), which can leave one blocked on the pool's queue lock when the pool terminates
    # them (seen hanging on main too)
    "--num_proc", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.helpers.runs import launch

    out = tmp_path_factory.mktemp("attributes") / "run"
    launch(2, out, *RUN)
    return out


@pytest.mark.slow
def test_two_rank_run_learns_every_attribute_and_the_scalar_ranking(run):
    metrics = json.loads((run / "metrics.json").read_text())
    for name in NAMES:
        assert metrics[f"{name}/spearman"] >= 0.9, metrics
        assert metrics[f"{name}/num_ratings"] > 0
    assert metrics["pairwise_accuracy"] >= 0.9, metrics
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(f"{n}/mse" in r for r in logged if r["split"] == "train" for n in NAMES)
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["id2label"] == dict(zip("012", NAMES, strict=True)) and config["problem_type"] == "regression"
    assert config["bigrm_attributes"]["weights"] == WEIGHTS


@pytest.mark.slow
def test_merged_export_is_the_weighted_sum_and_score_eval_report_attributes(run, tmp_path):
    data = run / "synthetic-eval.jsonl"
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert cli.export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "merged"), "--merge-attributes"]) == 0
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(run / "final")
    from bigrm.config import DataConfig
    from bigrm.data.rows import load_examples
    from bigrm.data.tokenise import tokenize_examples

    examples, _ = load_examples([str(data)], DataConfig(max_length=64))
    groups, _ = tokenize_examples(examples[0], tok, 64, "error")
    heads = plain_logits(run / "final", groups)
    merged = plain_logits(tmp_path / "merged", groups, num_labels=1)
    torch.testing.assert_close(merged[:, 0], heads @ torch.tensor(WEIGHTS), atol=1e-5, rtol=0)

    assert cli.score_main(["--model", str(run / "final"), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 0
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    head = AttributeHead.from_dict(json.loads((run / "final" / "config.json").read_text())["bigrm_attributes"])
    outputs = torch.tensor(
        [[v[n][i] for n in NAMES] for v in (s["attributes"] for s in scored) for i in range(len(v[NAMES[0]]))]
    )
    np.testing.assert_allclose(outputs.numpy(), head.raw(heads.double()).numpy(), atol=1e-4)  # raw-scale ratings
    rewards = [r for s in scored for r in s["rewards"]]
    np.testing.assert_allclose(rewards, merged[:, 0].numpy(), atol=1e-4)  # the scalar is the merged model's logit
    assert len(scored) == len(rows)
    per_token = ["--model", str(run / "final"), "--data", str(data), "--out", str(tmp_path / "t.jsonl"), "--per-token"]
    assert cli.score_main(per_token) == 0
    for row in map(json.loads, (tmp_path / "t.jsonl").read_text().splitlines()):  # the scalar at every token
        assert [v[-1] for v in row["per_token_rewards"]] == pytest.approx(row["rewards"], abs=1e-5)

    assert cli.eval_main(["--model", str(run / "final"), "--data", str(data), "--out", str(tmp_path / "e.json")]) == 0
    evaluated, metrics = json.loads((tmp_path / "e.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert evaluated["pairwise_accuracy"] == metrics["pairwise_accuracy"]
    for name in NAMES:
        assert evaluated[f"{name}/spearman"] == pytest.approx(metrics[f"{name}/spearman"], abs=1e-6)
        assert evaluated[f"{name}/mse"] == pytest.approx(metrics[f"{name}/mse"], abs=1e-4)
