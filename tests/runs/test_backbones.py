"""The backbone matrix: for every family in conftest.BACKBONES (sliding windows, per-layer-type windows,
soft-capping, the model's own scaling, grouped-query heads, MoE, rope scaling), packed and prompt-shared rewards and
gradients equal each sequence's plain transformers forward alone (fp32), under every CPU backend; what a backend
cannot compute is refused with a clear error before any work."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_training_refuses_an_impossible_backend_before_any_work(backbone_dir, tmp_path):
    """`bigrm train` on a soft-capped model under sdpa: exit 2 with the reason, before data or weights are touched."""
    import subprocess

    from tests.helpers.runs import ENV, SMALL, command

    out = tmp_path / "run"
    args = [*SMALL, "--model.path", str(backbone_dir("gemma2")), "--model.attn_impl", "sdpa"]
    proc = subprocess.run(command(1, out, *args), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "'gemma2' uses attention logit soft-capping, which attn_impl=sdpa cannot compute; use eager" in proc.stderr
    assert not (out / "synthetic-train.jsonl").exists()
