"""Exports verify themselves: a plain transformers classifier that reproduces the trained model's rewards, or an
ExportError. The reference is plain transformers on each sequence alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bigrm.artifacts import checkpoint, export
from bigrm.errors import ExportError
from bigrm.kinds import RewardKind
from bigrm.model.reward_model import load_classifier


def test_export_tolerance_by_dtype(tmp_path):
    expected = torch.tensor([0.5, -1.25, 2.0])
    fp32, bf16 = export.tolerance(torch.float32), export.tolerance(torch.bfloat16)
    assert export.check(expected, expected + 5e-5, fp32, tmp_path) is None
    message = export.check(expected, expected + torch.tensor([0.0, 0.01, 0.0]), fp32, tmp_path)
    assert message and "max reward difference 0.01" in message and str(tmp_path) in message
    assert export.check(expected, expected + 0.04, bf16, tmp_path) is None  # bf16's wider tolerance
    # an LLM.int8 base quantises activations in the adapted forward, not in the merged export
    assert export.tolerance(torch.float32, quant_bits=8) == bf16 and export.tolerance(torch.float32, 4) == fp32


def sequences(seed: int, groups: int = 3) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(3, 300, int(rng.integers(4, 20))).tolist() for _ in range(int(rng.integers(2, 4)))]
            for _ in range(groups)]  # fmt: skip


def plain(dest, ids: list[int]) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(dest, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def fake_checkpoint(tmp_path, model_dir, verify) -> Path:
    """A complete ZeRO-0 checkpoint of the model at model_dir, as the trainer writes it."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    classifier = load_classifier(str(model_dir), torch.float32, "sdpa", tok)
    path = checkpoint.root(tmp_path) / checkpoint.tag(1)
    path.mkdir(parents=True)
    state = {export.PREFIX + k: v for k, v in classifier.state_dict().items()}
    torch.save({"module": state}, path / "mp_rank_00_model_states.pt")
    classifier.config.save_pretrained(path / "hf")
    tok.save_pretrained(path / "hf")
    torch.save(verify, path / "verify.pt")
    meta = {"step": 1, "world": 1, "zero_stage": 0, "files": checkpoint.manifest(path, 0)}
    (path / checkpoint.COMPLETE).write_text(json.dumps(meta))
    return path


def test_a_checkpoint_exports_to_a_plain_classifier_with_the_same_rewards(tmp_path, llama_dir):
    verify = sequences(0)
    ckpt = fake_checkpoint(tmp_path, llama_dir, verify)
    rewards = export.export_checkpoint(ckpt, tmp_path / "out")
    flat = [s for g in verify for s in g]
    assert rewards.tolist() == pytest.approx([plain(tmp_path / "out", s) for s in flat], abs=1e-5)
    assert rewards.tolist() == pytest.approx([plain(llama_dir, s) for s in flat], abs=1e-5)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == tok.pad_token_id


def test_an_export_that_does_not_reproduce_the_model_raises(tmp_path, llama_dir, monkeypatch):
    ckpt = fake_checkpoint(tmp_path, llama_dir, sequences(1))
    real = RewardKind.plain_rewards
    monkeypatch.setattr(RewardKind, "plain_rewards", lambda *a: real(*a) + 0.01)
    with pytest.raises(ExportError, match="does not reproduce the trained model"):
        export.export_checkpoint(ckpt, tmp_path / "out")


def test_reward_statistics_go_into_config_json(tmp_path, llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    classifier = load_classifier(str(llama_dir), torch.float32, "sdpa", tok)
    export.save_classifier(classifier, classifier.state_dict(), tok, tmp_path, {"reward_mean": 0.25, "reward_std": 2.0})
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["bigrm_reward_mean"], saved["bigrm_reward_std"]) == (0.25, 2.0)


def test_bigrm_export_of_a_checkpoint_whose_verify_file_would_run_code_refuses_it(tmp_path, llama_dir, capsys):
    """The audit's case: a crafted verify.pt ran a shell command on `bigrm export` before failing."""
    from bigrm.cli import export_main
    from tests.helpers.crafted import code_pickle, remanifest

    ckpt = fake_checkpoint(tmp_path, llama_dir, sequences(0))
    marker = tmp_path / "ran"
    code_pickle(ckpt / "verify.pt", marker, lambda payload: [[payload]])
    remanifest(ckpt)
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {ckpt}: refused to load: a file in it would call posix.system (a checkpoint may run no code)"
    ] and "Traceback" not in err
    assert not marker.exists()
