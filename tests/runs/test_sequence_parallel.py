"""train.sequence_parallel (DeepSpeed Ulysses) on CPU ranks: gradients equal to one process's, and a whole run equal
to a one-rank run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.paths import REPO
from tests.helpers.runs import ENV, SMALL, command, free_port, launch, train_losses

pytestmark = pytest.mark.slow

WORKER = REPO / "tests" / "helpers" / "sequence_parallel_worker.py"


def test_two_groups_of_two_give_one_process_gradients(tmp_path):
    """4 ranks as 2 data-parallel groups × sequence parallel 2: every case's values and its optimizer step's gradients
    equal the same two micro-batches on one process without DeepSpeed (what 2 data-parallel ranks compute), with
    prompt-shared groups, PRM rows, a sliding-window backbone, and segments across the split point."""
    out = tmp_path / "grads.pt"
    runner = Path(sys.executable).parent / "deepspeed"
    cmd = [str(runner), "--num_gpus", "4", "--master_port", str(free_port()), str(WORKER), str(out), "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = torch.load(out)
    assert set(results) == {"llama_shared_sdpa", "llama_eager", "qwen2_sliding_shared"}
    for name, case in results.items():
        assert case["split"] and all(case["straddles"]), name
        assert len(case["values"]) == 1  # rank 0's group trained one of the two micro-batches
        for got, want in zip(case["values"], case["reference_values"], strict=True):
            assert len(got) == 12  # 7 rewards, 5 step ends
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=name)
        assert case["grads"].keys() == case["reference_grads"].keys()
        for param, grad in case["reference_grads"].items():
            assert grad.abs().max() > 0, param
            torch.testing.assert_close(case["grads"][param], grad, atol=1e-5, rtol=1e-5, msg=f"{name} {param}")


def test_sequence_parallel_run_equals_one_rank(tmp_path):
    """2 ranks as one sequence-parallel group train, evaluate and export as 1 rank does: the same per-step losses and
    eval metrics; the exported weights agree to Adam's amplification of float noise in near-zero gradients."""
    args = [*SMALL, "--max_steps", "3", "--share_prompt", "true", "--lr", "3e-3", "--data.synthetic.num_train", "64"]
    launch(1, tmp_path / "one", *args)
    proc = launch(2, tmp_path / "sp", *args, "--sequence_parallel", "2")
    assert "world 2 (sequence parallel 2)" in proc.stdout
    one, sp = train_losses(tmp_path / "one"), train_losses(tmp_path / "sp")
    assert len(one) == 3 and sp == pytest.approx(one, abs=1e-5)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "sp")]
    assert metrics[1] == pytest.approx(metrics[0], abs=1e-5)
    weights = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("one", "sp")]
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, atol=1e-4, rtol=0, msg=name)


def test_sizes_the_model_or_launch_cannot_split_stop_before_any_work(tmp_path):
    proc = subprocess.run(
        command(1, tmp_path / "run", *SMALL, "--sequence_parallel", "2"), cwd=REPO, env=ENV, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train.sequence_parallel: 2 does not divide the 1 ranks launched" in proc.stderr
    assert not (tmp_path / "run" / "random-init").exists()
