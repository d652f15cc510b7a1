"""Process reward models: stepwise rows through tokenisation, the token store and packing, read at every step end
exactly as a plain transformers forward of each sequence alone; the token-classifier export; 2-rank ZeRO-3 runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from bigrm import cli
from bigrm.builtin.synthetic import make_rows, make_step_rows
from bigrm.kinds.steps import LAYOUT_KEY, SEPARATOR_KEY, STEP_TOKEN_KEY
from tests.helpers.runs import launch
from tests.helpers.steps import ARGS, natural_rows, write


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
    assert config[LAYOUT_KEY] == "trl" and config[STEP_TOKEN_KEY] == ""

    # bigrm score's step rewards are what the export gives, re-loaded with plain transformers, at the separators
    data = out / "synthetic-eval.jsonl"
    assert cli.score_main(["--model", str(out / "final"), "--data", str(data), "--out", str(tmp_path / "s.jsonl"),
                           "--data.max_length", "64"]) == 0  # fmt: skip
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForTokenClassification.from_pretrained(out / "final").eval()
    worst = 0.0
    for row in scored[:20]:  # laid out as TRL's PRMTrainer (and README) does: BOS, prompt, each step + "\n"
        ids, ends = [tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"], []
        for step in row["completions"]:
            ids += tok(step, add_special_tokens=False)["input_ids"] + tok("\n", add_special_tokens=False)["input_ids"]
            ends.append(len(ids) - 1)
        ids = torch.tensor([ids])
        with torch.no_grad():
            probs = model(input_ids=ids).logits[0].softmax(-1)[:, 1]
        at_separators = probs[ends].tolist()
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
           "--data.eval_files", f"[{files['steps_eval']},{files['ranked_eval']}]", *ARGS,
           # 3 epochs are at the onset of step learning (accuracy sits at the 0.62 base rate, then jumps): joined
           # reaches 0.76-0.98 over seeds 42, 1-4, trl 0.62-0.91, its leading BOS (ranked rows have none with this
           # tokenizer) delaying the onset on the same batches; neither is robust yet (issue 27's note)
           "--data.step_layout", "joined")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step_accuracy"] >= 0.95 and metrics["num_solutions"] == 100
    assert metrics["pairwise_accuracy"] > 0.6 and metrics["num_prompts"] == 60
    drawn = json.loads((out / "eval_report" / "report.json").read_text())  # the ranked prompts alone
    assert list(drawn["accuracy"]["prompts_by_subset"].values()) == [60]


def plain_prm_losses(model_dir: Path, rows: list[dict], steps: int, lr: float, warmup: int) -> list[float]:
    """A plain PyTorch PRM loop: every row laid out as TRL does and forwarded alone, BCE at its separators averaged
    over all steps, one full-batch AdamW update per step, gradients clipped at 1, and DeepSpeed's WarmupCosineLR as
    bigrm configures it (linear warm-up from 0, cosine decay to 0.1 of lr), which starts one update late: at
    construction it sets lr from iteration -1 (ratio 0), and its first step() gives iteration 0 (ratio 0 again)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = []
    for r in rows:
        ids = [tok.bos_token_id] + tok(r["prompt"], add_special_tokens=False)["input_ids"]
        ends = []
        for step in r["completions"]:
            ids += tok(step, add_special_tokens=False)["input_ids"] + tok("\n", add_special_tokens=False)["input_ids"]
            ends.append(len(ids) - 1)
        seqs.append((torch.tensor([ids]), ends))
    labels = torch.tensor([float(y) for r in rows for y in r["labels"]])

    def ratio(update: int) -> float:  # 0-based update
        i = update - 1  # DeepSpeed's iteration
        if i < warmup:
            return max(i, 0) / warmup
        return 0.1 + 0.9 * (1 + math.cos(math.pi * min(1.0, (i - warmup + 1) / (steps - warmup)))) / 2

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ratio)
    losses = []
    for _ in range(steps):
        values = [model.score(model.model(input_ids=ids).last_hidden_state)[0, ends, 0] for ids, ends in seqs]
        loss = F.binary_cross_entropy_with_logits(torch.cat(values), labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_prm_training_learns_as_a_plain_pytorch_loop(tmp_path, llama_dir):
    """One rank, the same init, rows and schedule: one full-batch update per epoch, so order cannot differ."""
    rows = natural_rows(16)
    data = write(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "run"
    launch(1, out, "--model.path", str(llama_dir), "--data.train_files", f"[{data}]", "--data.max_length", "256",
           "--epochs", "50", "--max_steps", "50", "--max_tokens_per_batch", "4096", "--lr", "1e-3",
           "--warmup_ratio", "0.1", "--min_lr_ratio", "0.1", "--log_every", "1", "--eval_every", "0",
           "--report_to", "none", "--export", "false")  # fmt: skip
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in logged if r.get("split") == "train"]
    assert [r["step"] for r in train] == list(range(1, 51))
    assert {r["num_steps"] for r in train} == {sum(len(r["labels"]) for r in rows)}  # every step, every update
    want = plain_prm_losses(llama_dir, rows, 50, 1e-3, warmup=5)  # round(0.1 * 50)
    got = [r["loss"] for r in train]
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert worst < 1e-5, list(zip(got, want, strict=True))
    assert want[-1] < 0.8 * want[0]  # it learns
