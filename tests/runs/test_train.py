"""Real DeepSpeed runs on CPU ranks: ZeRO-3 end to end, 1-rank/2-rank and ZeRO-2/ZeRO-3 parity, bad data."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from bigrm.config import DataConfig
from bigrm.data.rows import load_examples
from bigrm.data.sequences import Group
from bigrm.data.tokenise import tokenize_examples
from bigrm.kinds import RewardKind
from tests.helpers.paths import HH_DATA, REPO
from tests.helpers.runs import ENV, SMALL, command, launch, rewards_with_plain_transformers, train_losses

pytestmark = pytest.mark.slow


def test_zero3_two_ranks_end_to_end(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    # prompts encoded once per group: the trainer's eval must still equal per-sequence plain transformers below
    proc = launch(2, out, *SMALL, "--lr", "3e-3", "--report_to", "tensorboard", "--share_prompt", "true")
    assert f"metrics: {out / 'metrics.json'}" in proc.stdout + proc.stderr
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    losses = train_losses(out)
    assert len(losses) >= 8
    logged = next(r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["split"] == "train")
    assert logged["tflops_per_gpu"] > 0 and logged["tokens_per_s_per_gpu"] == pytest.approx(logged["tokens_per_s"] / 2)
    assert "mfu" not in logged  # no known peak on CPU
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05

    metrics = json.loads((out / "metrics.json").read_text())
    assert {"pairwise_accuracy", "loss", "kendall_tau", "num_prompts"} <= set(metrics)
    assert metrics["num_prompts"] == 48

    # the export is a plain HF classifier whose rewards reproduce the trainer's eval exactly
    final = out / "final"
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert json.loads((final / "config.json").read_text())["pad_token_id"] == tok.pad_token_id
    examples, _ = load_examples([str(out / "synthetic-eval.jsonl")], DataConfig(max_length=64))
    groups, _ = tokenize_examples(examples[0], tok, 64, "error")
    rewards = rewards_with_plain_transformers(final, groups)
    pairs = [(r[i], r[j]) for r in rewards for i in range(len(r)) for j in range(i + 1, len(r))]
    accuracy = sum(a > b for a, b in pairs) / len(pairs)
    assert accuracy == pytest.approx(metrics["pairwise_accuracy"], abs=1e-12)
    # the final eval drawn (eval_report/): every completion's reward gathered from both ranks
    drawn = json.loads((out / "eval_report" / "report.json").read_text())
    by_k = {}
    for r in rewards:
        wins = [r[i] > r[j] for i in range(len(r)) for j in range(i + 1, len(r))]
        by_k.setdefault(str(len(r)), []).extend(wins)
    assert drawn["accuracy"]["by_k"] == {k: sum(v) / len(v) for k, v in sorted(by_k.items())}
    assert drawn["accuracy"]["prompts_by_subset"] == {"synthetic-eval.jsonl": 48}
    assert sum(drawn["reward_histogram"]["counts"][0]) == 48 and (out / "eval_report" / "reliability.png").exists()
    loss = sum(
        sum(torch.nn.functional.softplus(torch.tensor(b - a)).item() for a, b in [(r[i], r[j])
            for i in range(len(r)) for j in range(i + 1, len(r))]) / (len(r) * (len(r) - 1) / 2)
        for r in rewards
    ) / len(rewards)  # fmt: skip
    assert loss == pytest.approx(metrics["loss"], abs=1e-5)

    # bigrm eval on the export and on the final checkpoint reproduces the trainer's eval
    from bigrm import cli

    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    for model in (final, ckpt):
        assert cli.eval_main(["--model", str(model), "--data", str(out / "synthetic-eval.jsonl"),
                              "--out", str(tmp_path / "eval.json"), "--data.max_length", "64"]) == 0  # fmt: skip
        evaluated = json.loads((tmp_path / "eval.json").read_text())
        assert evaluated["pairwise_accuracy"] == metrics["pairwise_accuracy"]
        assert evaluated["num_pairs"] == metrics["num_pairs"] and evaluated["num_prompts"] == 48
        assert evaluated["loss"] == pytest.approx(metrics["loss"], abs=1e-5)
        assert evaluated["kendall_tau"] == pytest.approx(metrics["kendall_tau"], abs=1e-9)

    # bigrm export of the ZeRO-3 checkpoint on one process equals the export written at the end of training
    assert cli.export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "exported")]) == 0
    again = rewards_with_plain_transformers(tmp_path / "exported", groups)
    assert [x for r in again for x in r] == pytest.approx([x for r in rewards for x in r], abs=1e-6)
    # ... and an export that does not reproduce the model's rewards stops with an error

    real = RewardKind.plain_rewards
    monkeypatch.setattr(RewardKind, "plain_rewards", lambda *a: real(*a) + 0.01)
    assert cli.export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "bad")]) == 2
    assert "does not reproduce the trained model" in capsys.readouterr().err

    # README's plain-transformers snippet gives the reward of the same scored sequence
    snippet = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)[1]
    namespace: dict = {}
    exec(snippet.replace("outputs/run/final", str(final)), namespace)
    from bigrm.data.sequences import scored_sequence

    haiku = scored_sequence(tok, [{"role": "user", "content": "Write a haiku."}], "Old pond...", 1024)
    expected = rewards_with_plain_transformers(final, [Group((np.array(haiku.ids),), "")])
    assert namespace["reward"] == pytest.approx(expected[0][0], abs=1e-6)


def test_one_rank_and_two_ranks_take_the_same_steps(tmp_path):
    """The same groups per optimizer step: 1 rank × 2 micro-batches equals 2 ranks × 1 (ZeRO-3 and ZeRO-2), and
    ZeRO-3 with compiled, checkpointed blocks (ZeRO-3 leaves) trains the same."""
    args = [*SMALL, "--max_steps", "4", "--export", "false"]
    launch(1, tmp_path / "one", *args, "--micro_batches_per_step", "2")
    launch(2, tmp_path / "two", *args)
    launch(2, tmp_path / "zero2", *args, "--deepspeed_config", "ds_configs/zero2.json")
    proc = launch(2, tmp_path / "compiled", *args, "--model.compile", "true", "--model.gradient_checkpointing", "true")
    one, two, zero2, compiled = (train_losses(tmp_path / name) for name in ("one", "two", "zero2", "compiled"))
    assert len(one) == len(two) == len(zero2) == len(compiled) == 4
    assert one[0] == pytest.approx(two[0], abs=1e-6)
    assert one == pytest.approx(two, abs=1e-5)
    assert two == pytest.approx(zero2, abs=1e-5)
    assert compiled == pytest.approx(two, abs=1e-4)
    assert "compiled blocks" in proc.stdout and "recompile_limit" not in proc.stderr
    assert not (tmp_path / "two" / "final").exists()  # --export false


def test_real_hh_data_trains_with_truncation(tmp_path):
    """Real text through a bf16, checkpointed GPT-NeoX whose tokenizer pads with EOS: random init, new pad, export."""
    from transformers import AutoTokenizer

    from bigrm.builtin.tiny import write_tiny

    base = write_tiny(tmp_path / "neox", "gpt_neox")
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(base)
    out = tmp_path / "hh"
    proc = launch(
        1, out, "--model.path", str(base), "--model.random_init", "true", "--model.dtype", "bf16",
        "--model.gradient_checkpointing", "true",
        "--data.train_files", f"[{HH_DATA}]", "--data.eval_fraction", "0.05", "--data.max_length", "384",
        "--data.skip_invalid", "true", "--data.overlong", "skip", "--max_tokens_per_batch", "2048",
        "--max_steps", "3", "--log_every", "1", "--report_to", "none",
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    # four HH rows end in an empty chosen reply: skipped, counted and named
    assert "2312 rows read, 4 skipped (4 × chosen: empty completion)" in log
    cut = re.search(r"train tokens: (\d+) prompts, .* (\d+) sequences had their prompt cut .* skipped: (\d+) ×", log)
    assert cut and int(cut[2]) > 0 and int(cut[3]) > 0
    evaluated = json.loads((out / "metrics.json").read_text())["num_prompts"]
    skipped_eval = re.search(r"eval tokens: .* skipped: (\d+) ×", log)
    held = re.search(r"eval data: (\d+) prompts held out \((\d+) groups", log)  # 2306 distinct prompts in 2308 rows
    assert int(held[1]) == round(0.05 * 2306) and int(held[1]) <= int(held[2]) <= int(held[1]) + 2
    assert evaluated == int(held[2]) - (int(skipped_eval[1]) if skipped_eval else 0)
    exported = AutoTokenizer.from_pretrained(out / "final")
    assert exported.pad_token == "<|bigrm_pad|>" and exported.pad_token_id != exported.eos_token_id
    assert json.loads((out / "final" / "config.json").read_text())["architectures"] == [
        "GPTNeoXForSequenceClassification"
    ]


def test_bad_data_stops_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "ranked_outputs": ["a", "b"]}\n{"prompt": "p", "ranked_outputs": ["a"]}\n')
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--output_dir", str(out),
         "--data.train_files", f"[{bad}]"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"{bad}:line 2: field 'ranked_outputs': needs at least 2 completions" in proc.stderr
    assert not (out / "log.jsonl").exists() and not (out / "metrics.json").exists()


def test_killed_run_resumes_exactly(tmp_path):
    """2 ranks, ZeRO-3, fp32: killed after a checkpoint, resumed with `auto`, the losses match an unbroken run."""
    args = [*SMALL, "--save_every", "3", "--keep_checkpoints", "2", "--export", "false"]
    launch(2, tmp_path / "whole", *args)

    out = tmp_path / "broken"
    proc = subprocess.Popen(command(2, out, *args), cwd=REPO, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = out / "checkpoints" / "step-00000006" / "complete.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode != 0, "the run finished before it could be interrupted"
    assert not (out / "metrics.json").exists()
    # a save that died half-written, newer than every complete one: resume must not trust it
    torn = out / "checkpoints" / "step-00000099"
    torn.mkdir()
    (torn / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"torn")

    resumed = launch(2, out, *args, "--resume", "auto")
    match = re.search(r"resumed from .*step-(\d+) at step (\d+)", resumed.stdout + resumed.stderr)
    assert match and int(match[2]) >= 6
    whole, broken = train_losses(tmp_path / "whole"), train_losses(out)
    assert len(whole) == len(broken) > 6
    assert broken == pytest.approx(whole, abs=1e-6)
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(
        json.loads((tmp_path / "whole" / "metrics.json").read_text()), abs=1e-6
    )
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*") if (p / "complete.json").exists())
    assert len(kept) == 2 and kept[-1] == f"step-{len(whole):08d}"  # keep_checkpoints: 2, the final one last


def test_mixed_label_kinds_train_in_one_run(tmp_path):
    """Ranked rows with ties, scored rows and weighted pairs from three files, ListMLE + regression + tie term."""
    from bigrm.builtin.synthetic import make_rows

    rows = make_rows(360, 3, 5, seed=3)
    ranked = [{"prompt": r["prompt"], "ranked_outputs": [r["ranked_outputs"][:1], r["ranked_outputs"][1:3],
               *r["ranked_outputs"][3:]]} for r in rows[:120]]  # fmt: skip
    scored = [{"prompt": r["prompt"], "completions": r["ranked_outputs"][::-1],
               "scores": list(range(len(r["ranked_outputs"])))} for r in rows[120:240]]  # fmt: skip
    pairs = [{"prompt": r["prompt"], "chosen": r["ranked_outputs"][0], "rejected": r["ranked_outputs"][-1],
              "weight": 2.0} for r in rows[240:]]  # fmt: skip
    files = []
    for name, data in (("ranked", ranked), ("scored", scored), ("pairs", pairs)):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in data))
    out = tmp_path / "mixed"
    launch(
        1, out, "--data.train_files", json.dumps([str(f) for f in files]), "--data.eval_files", f"[{files[0]}]",
        "--data.max_length", "64", "--objective", "listmle", "--scores", "both", "--tie_coef", "0.1",
        "--l2_rewards_coef", "0.01", "--epochs", "2", "--max_tokens_per_batch", "600", "--lr", "3e-3",
        "--log_every", "5", "--report_to", "none",
    )  # fmt: skip
    losses = train_losses(out)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_tie_pairs"] == 120 and 0 <= metrics["tie_accuracy"] <= 1
    assert metrics["pairwise_accuracy"] > 0.6
    exported = json.loads((out / "final" / "config.json").read_text())
    assert exported["bigrm_reward_std"] > 0 and "bigrm_reward_mean" in exported


def test_impossible_attention_stops_before_any_work(tmp_path):
    """A CUDA-only kernel on a CPU machine: a one-line error and exit 2, before the model or data are touched."""
    out = tmp_path / "run"
    proc = subprocess.run(command(1, out, *SMALL, "--model.attn_impl", "flex"), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "error: model.attn_impl=flex needs CUDA" in proc.stderr
    assert not (out / "random-init").exists() and not (out / "synthetic-train.jsonl").exists()


def test_cached_data_trains_as_freshly_tokenised_data(tmp_path):
    """Two ranks start on an empty token cache: one builds it while the other polls, both memory-map it, and the
    steps equal a run that tokenises in memory (data.cache false). `bigrm prepare` fills the cache a run reuses."""
    cache = tmp_path / "cache"
    args = [*SMALL, "--max_steps", "4", "--export", "false", "--data.cache_dir", str(cache)]
    built = launch(2, tmp_path / "cached", *args)
    # rank 0 prints its own view: "built" if it took the lock first, else "reused" after polling rank 1's build
    assert "(built in" in built.stdout or "(reused in" in built.stdout
    assert len(list(cache.glob("*/complete.json"))) == 1  # built once
    launch(2, tmp_path / "fresh", *args, "--data.cache", "false")
    assert train_losses(tmp_path / "cached") == pytest.approx(train_losses(tmp_path / "fresh"), abs=1e-6)
    assert len(train_losses(tmp_path / "fresh")) == 4

    from bigrm import cli

    out = tmp_path / "prepared"
    assert cli.prepare_main(["--output_dir", str(out), *args]) == 0
    reused = launch(2, out, *args)
    assert "(reused in" in reused.stdout and len(list(cache.glob("*/complete.json"))) == 2
    assert train_losses(out) == pytest.approx(train_losses(tmp_path / "fresh"), abs=1e-6)
