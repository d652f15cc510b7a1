"""The GPU benchmarks, smoke-tested end to end on CPU at the smallest size, and the parts that decide their figures."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.paths import HH_DATA, REPO

BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))  # the benchmarks are scripts that import each other by file name

import bench_gpu  # noqa: E402
import bench_speed  # noqa: E402
import models  # noqa: E402

pytestmark = pytest.mark.skipif(not HH_DATA.exists(), reason="needs the HH data in ../shared/data")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}


def bench(script: str, tmp_path: Path, *args: str) -> tuple[str, dict]:
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(BENCH / script), *args, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.slow
def test_bench_gpu_runs_the_trainer_on_cpu(tmp_path):
    stdout, figures = bench(
        "bench_gpu.py", tmp_path, "--size", "tiny", "--device", "cpu", "--steps", "4", "--warmup", "2",
        "--log_every", "1", "--max_tokens_per_batch", "2048",
    )  # fmt: skip
    runs = {r["setup"]: r for r in figures["runs"]}
    assert list(runs) == ["1b-full", "7b-qlora"]
    for name, r in runs.items():
        assert f"| {name} | auto (sdpa) |" in stdout
        assert f"$ {r['command']}" in stdout and "launch/train.py" in r["command"]
        assert r["windows"] == 2  # windows ending at steps 3 and 4: those starting at or after the warm-up
        for key in ("tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "padding_efficiency", "budget_fill"):
            assert positive(r[key]), (name, key, r[key])
        assert r["peak_memory_gib"] is None  # CUDA only
    assert runs["1b-full"]["trainable"] == runs["1b-full"]["parameters"]
    assert runs["7b-qlora"]["trainable"] < runs["7b-qlora"]["parameters"] / 2
    assert not runs["1b-full"]["gradient_checkpointing"] and runs["7b-qlora"]["gradient_checkpointing"]


@pytest.mark.slow  # four child processes and two libraries training: half a minute on 2 cores
def test_bench_speed_compares_with_trl_on_cpu(tmp_path):
    pytest.importorskip("trl")
    stdout, figures = bench(
        "bench_speed.py", tmp_path, "--prompts", "4", "4", "4", "--repeats", "1", "--data", "K=2", "--skip-loss-share"
    )
    assert list(figures) == ["K=2"]
    rows = figures["K=2"]
    assert list(rows) == bench_speed.VARIANTS
    for name, r in rows.items():
        assert f"\n{name} " in stdout
        for key in ("prompts_per_s", "real_tokens_per_s", "padding_efficiency", "peak_rss_mib"):
            assert positive(r[key]), (name, key, r[key])
    for name in ("bigrm", "bigrm+share"):
        assert all(positive(x) for x in rows[name]["vs_trl-all"])
    # the same numerator for every variant: tokens/s over prompts/s is the data set's tokens per prompt
    per_prompt = {r["real_tokens_per_s"] / r["prompts_per_s"] for r in rows.values()}
    assert max(per_prompt) == pytest.approx(min(per_prompt))
    assert "fused loss alone" not in stdout


def write_log(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"split": "train", **r}) + "\n" for r in rows))
    return path


def test_summary_takes_windows_after_warmup(tmp_path):
    windows = [
        {"step": s, "tokens_per_s_per_gpu": t, "tflops_per_gpu": t / 10, "padding_efficiency": 1.0,
         "budget_fill": 0.9, "peak_memory_gib": s / 10}
        for s, t in [(5, 1.0), (10, 2.0), (15, 30.0), (20, 40.0), (25, 50.0)]
    ]  # fmt: skip
    log = write_log(tmp_path / "log.jsonl", windows)
    summary = bench_gpu.summarise(log, warmup=10, steps=25)
    assert summary["windows"] == 3  # (10, 15], (15, 20], (20, 25]
    assert summary["tokens_per_s_per_gpu"] == 40.0 and summary["tflops_per_gpu"] == 4.0
    assert summary["mfu"] is None  # not logged: no known peak
    assert summary["peak_memory_gib"] == 2.5
    with pytest.raises(SystemExit, match="stopped before step 30"):
        bench_gpu.summarise(log, warmup=10, steps=30)
    with pytest.raises(SystemExit, match="raise --steps"):
        bench_gpu.summarise(log, warmup=25, steps=25)


def test_benchmark_data_fills_the_steps_with_valid_ranked_rows(tmp_path):
    from transformers import AutoTokenizer

    from bigrm.config import DataConfig
    from bigrm.data.packing import pack_bins
    from bigrm.data.rows import load_examples
    from bigrm.data.tokenise import tokenize_examples

    model = models.write_config("tiny", tmp_path / "model")
    rows = bench_gpu.write_data(tmp_path / "data.jsonl", model, steps=6, budget=2048)
    (examples,), report = load_examples([str(tmp_path / "data.jsonl")], DataConfig())  # the trainer's validation
    assert len(examples) == rows and {len(ex.completions) for ex in examples} == {bench_gpu.K}
    groups, _ = tokenize_examples(examples, AutoTokenizer.from_pretrained(model), 1024, "error")
    sizes = [g.num_tokens for g in groups]
    assert max(sizes) <= 2048 and len(pack_bins(list(range(len(groups))), sizes, 2048, window=1024)) > 6


def test_bench_gpu_command_per_setup(tmp_path):
    args = argparse.Namespace(
        gradient_checkpointing=None, compile=True, budget=16384, steps=60, log_every=5, device="cuda"
    )

    def command(setup: str, attn: str) -> str:
        return " ".join(bench_gpu.command(setup, tmp_path, tmp_path / "d.jsonl", tmp_path / "o", attn, args))

    full, qlora = command("1b-full", "varlen"), command("7b-qlora", "flex")
    assert "--train.peak_tflops" not in full  # on a GPU the trainer knows its peak
    assert "--model.gradient_checkpointing false" in full and "--model.compile true" in full
    assert "--model.attn_impl varlen" in full and "--train.max_tokens_per_batch 16384" in full
    assert "--lora.r 16 --quantization.bits 4" in qlora and "--model.gradient_checkpointing true" in qlora
    args.gradient_checkpointing = True
    assert "--model.gradient_checkpointing true" in command("1b-full", "auto")


def speed_settings(**chosen) -> bench_speed.Run:
    args = argparse.Namespace(device="cpu", dtype=None, gradient_checkpointing=False, attn="auto")
    return bench_speed.run_settings(argparse.Namespace(**{**vars(args), **chosen}))


def test_bench_speed_settings():
    default = speed_settings()
    assert (default.dtype, default.checkpointing, default.attn) == (torch.float32, False, "sdpa")
    assert speed_settings(dtype="bf16", gradient_checkpointing=True).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs CUDA"):
        speed_settings(attn="varlen")


def test_trl_trains_like_bigrm(tmp_path):
    """TRL's RewardConfig defaults to bf16 autocast (on CPU too) and gradient checkpointing: both are overridden
    with the settings bigrm runs under, so the speed-up measures the method, not the settings."""
    pytest.importorskip("trl")
    from trl import RewardConfig

    out_of_the_box = RewardConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert out_of_the_box.bf16 and out_of_the_box.gradient_checkpointing  # why the override matters
    default = bench_speed.trl_config(str(tmp_path), 1, speed_settings())
    assert not default.bf16 and not default.gradient_checkpointing
    aligned = bench_speed.trl_config(str(tmp_path), 1, speed_settings(dtype="bf16", gradient_checkpointing=True))
    assert aligned.bf16 and aligned.gradient_checkpointing


@pytest.mark.slow  # two 2-rank runs of a tiny Qwen-tokenizer model (today's code from git: not here)
def test_bench_data_compares_todays_data_phase_with_the_cached_one(tmp_path):
    stdout, figures = bench("bench_data.py", tmp_path, "--sizes", "60", "--baseline", "", "--out", str(tmp_path))
    (row,) = figures
    assert row["prompts"] == 60 and row["sequences"] == 420 and row["tokens"] == row["tokens_new"] > 0
    for key in ("today_cold_s", "new_cold_s", "new_warm_s", "new_first_step_s"):
        assert positive(row[key]), key
    assert len(row["new_rank_rss_gb"]) == 2 and "today_first_step_s" not in row  # the two ranks, not the launcher
    assert stdout.splitlines()[-2].startswith("prompts  cold today")


TRL_PRM = Path("/tmp/trl_prm")  # bench_prm.py's default side install of trl==1.13.0, the last with PRMTrainer


@pytest.mark.slow  # two libraries training in child processes: ~15 s on 2 cores
@pytest.mark.skipif(not (TRL_PRM / "trl" / "experimental" / "prm").is_dir(), reason="needs trl==1.13.0 in /tmp/trl_prm")
def test_bench_prm_compares_with_trl_prm_trainer_on_cpu(tmp_path):
    stdout, figures = bench("bench_prm.py", tmp_path, "--prompts", "4", "--solutions", "2", "--repeats", "1")
    assert figures["counts"]["solutions"] == 8 and figures["counts"]["groups"] == 4
    for name in ("bigrm", "trl"):
        f = figures["figures"][name]
        assert f"\n{name} " in stdout
        for key in ("solutions_per_s", "steps_per_s", "tokens_per_s", "padding_efficiency", "peak_rss_mib"):
            assert positive(f[key]), (name, key, f[key])
    assert figures["figures"]["bigrm"]["padding_efficiency"] == 1.0
    assert figures["ratio"] == pytest.approx(
        figures["figures"]["trl"]["seconds"] / figures["figures"]["bigrm"]["seconds"]
    )
