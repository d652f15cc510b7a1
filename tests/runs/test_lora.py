"""LoRA / QLoRA: what trains, packed parity of the adapted model, merged exports against the adapter forward, and
2-rank ZeRO-3 runs (train, save only what trained, resume exactly, export, score both forms alike)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bigrm import cli
from bigrm.artifacts import checkpoint, export
from bigrm.model import adapters
from tests.helpers.adapters import score
from tests.helpers.runs import SMALL, launch, train_losses

# adapters start as a no-op (B = 0): LoRA needs a few more steps than full fine-tuning to get going
LORA = ["--lora.r", "8", "--lora.alpha", "16", "--lr", "3e-3", "--gradient_checkpointing", "true", "--epochs", "3"]


@pytest.mark.slow
def test_lora_zero3_trains_saves_only_what_trained_resumes_and_exports(tmp_path):
    out = tmp_path / "whole"
    args = [*SMALL, *LORA, "--save_every", "4", "--keep_checkpoints", "0", "--peak_tflops", "0.5"]
    proc = launch(2, out, *args)
    assert "trainable" in proc.stdout + proc.stderr and "LoRA r=8" in proc.stdout + proc.stderr
    logged = next(r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["split"] == "train")
    assert logged["mfu"] == pytest.approx(logged["tflops_per_gpu"] / 0.5)  # train.peak_tflops, given on CPU
    losses = train_losses(out)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05

    # the checkpoint holds the adapters and the head, nothing of the frozen base
    steps = sorted((out / "checkpoints").glob("step-*"))
    last = steps[-1]
    state = checkpoint.consolidated_state_dict(last)
    assert state and all(".lora_" in k or k.startswith("classifier.score.") for k in state)
    base = load_file(out / "random-init" / "model.safetensors")
    assert not torch.allclose(state["classifier.score.weight"], base["score.weight"])

    # the merged export: untouched base weights where there are no adapters, W + (alpha / r) B A where there are
    merged = load_file(out / "final" / "model.safetensors")
    for name, weight in merged.items():
        a, b = (state.get(f"classifier.{name.removesuffix('.weight')}.lora_{x}.default.weight") for x in "AB")
        if name.startswith("score."):
            torch.testing.assert_close(weight, state[f"classifier.{name}"])
        elif a is None:
            torch.testing.assert_close(weight, base[name], atol=0, rtol=0, msg=name)
        else:
            torch.testing.assert_close(weight, base[name] + 16 / 8 * b @ a, atol=1e-6, rtol=1e-5, msg=name)

    # the adapter checkpoint and the merged export evaluate as the trainer did
    metrics = json.loads((out / "metrics.json").read_text())
    data = out / "synthetic-eval.jsonl"
    for model in (last, out / "final"):
        assert cli.eval_main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "e.json")]) == 0
        evaluated = json.loads((tmp_path / "e.json").read_text())
        assert evaluated["pairwise_accuracy"] == metrics["pairwise_accuracy"]
        assert evaluated["loss"] == pytest.approx(metrics["loss"], abs=1e-5)
    assert cli.export_main(["--checkpoint", str(last), "--out", str(tmp_path / "exported")]) == 0
    np.testing.assert_allclose(score(tmp_path / "exported", data, tmp_path / "a.jsonl"),
                               score(last, data, tmp_path / "b.jsonl"), atol=1e-5)  # fmt: skip

    # resumed from step 8 of a copy, the run takes the same steps from its trainable-only checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("final", "metrics.json", "log.jsonl"))
    for later in sorted((resumed / "checkpoints").glob("step-*"))[2:]:
        shutil.rmtree(later)
    proc = launch(2, resumed, *args, "--resume", "auto")
    assert "at step 8" in proc.stdout + proc.stderr
    assert train_losses(resumed) == pytest.approx(losses[8:], abs=1e-6)
    assert json.loads((resumed / "metrics.json").read_text()) == pytest.approx(metrics, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("bits, dtype, steps", [(4, "bf16", "0"), (8, "fp32", "12")])
def test_qlora_zero3_trains_and_exports_the_dequantised_merge(tmp_path, bits, dtype, steps):
    out = tmp_path / "run"
    launch(2, out, *SMALL, *LORA, "--quantization.bits", str(bits), "--dtype", dtype, "--max_steps", steps)
    if bits == 4:
        losses = train_losses(out)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert adapters.Settings.read(last / "hf").quantization.bits == bits
    config_json = json.loads((out / "final" / "config.json").read_text())
    assert "quantization_config" not in config_json and config_json["dtype"] == {"bf16": "bfloat16"}.get(
        dtype, "float32"
    )
    # scoring the adapter checkpoint (quantised base) and the merged export agree within the export tolerance
    data = out / "synthetic-eval.jsonl"
    a, b = score(last, data, tmp_path / "a.jsonl"), score(out / "final", data, tmp_path / "b.jsonl")
    tol = export.tolerance(torch.bfloat16 if dtype == "bf16" else torch.float32, bits)
    np.testing.assert_allclose(b, a, atol=tol * max(1.0, np.abs(a).max()))
