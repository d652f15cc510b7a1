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


def fake_checkpoint(tmp_path, model_dir, verify, stats: dict | None = None) -> Path:
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
    meta = {"step": 1, "world": 1, "zero_stage": 0, "files": checkpoint.manifest(path, 0), "reward_stats": stats}
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
    (tmp_path / "out").mkdir()
    export.seal(tmp_path / "out")  # an earlier export there: kept, not replaced by one that failed
    with pytest.raises(ExportError, match="does not reproduce the trained model"):
        export.export_checkpoint(ckpt, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints", "out"]  # no temporary directory left
    assert [p.name for p in (tmp_path / "out").iterdir()] == [export.VERIFIED]


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


def test_an_export_is_written_beside_its_destination_and_sealed_once_verified(tmp_path, llama_dir, monkeypatch):
    """The verification reads the temporary directory: the destination appears only verified, with VERIFIED."""
    ckpt = fake_checkpoint(tmp_path, llama_dir, sequences(2))
    read = []
    real = RewardKind.plain_rewards
    monkeypatch.setattr(RewardKind, "plain_rewards", lambda kind, dest, *a: read.append(dest) or real(kind, dest, *a))
    dest = tmp_path / "out"
    export.export_checkpoint(ckpt, dest)
    assert read[0].parent == tmp_path and read[0].name.startswith(".out.tmp-") and not read[0].exists()
    listed = json.loads((dest / export.VERIFIED).read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in dest.iterdir() if p.name != export.VERIFIED)
    export.check_export(dest)
    export.export_checkpoint(ckpt, dest)  # an earlier export is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "out"]


def test_a_full_disk_while_exporting_is_one_error_and_leaves_nothing(tmp_path, llama_dir, monkeypatch):
    import errno

    import transformers.modeling_utils

    ckpt = fake_checkpoint(tmp_path, llama_dir, sequences(0))

    def full(state, filename, metadata=None):
        Path(filename).write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    with pytest.raises(ExportError, match=f"cannot write the export {tmp_path / 'out'}: No space left on device"):
        export.export_checkpoint(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_an_export_destination_that_cannot_take_it_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_read_checkpoint", lambda *a: pytest.fail("loaded before the destination was checked"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    for dest, words in (
        (tmp_path / "file", "exists and is not a directory"),
        (tmp_path / "full", "holds files that are not a bigrm export"),
        (tmp_path / "file" / "out", f"cannot create {tmp_path / 'file'}"),
    ):
        with pytest.raises(ExportError, match=f"--out: .*{words}"):
            export.export_checkpoint(tmp_path / "ckpt", dest)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_bigrm_export_of_a_checkpoint_carries_the_reward_statistics_final_does(tmp_path, llama_dir):
    ckpt = fake_checkpoint(tmp_path, llama_dir, sequences(0), {"reward_mean": -0.5, "reward_std": 1.5})
    export.export_checkpoint(ckpt, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bigrm_reward_mean"], config["bigrm_reward_std"], config["mean"], config["std"]) == (
        -0.5, 1.5, -0.5, 1.5
    )  # fmt: skip
