"""Which checkpoint a resume trusts: only directories whose completion marker was written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigrm.artifacts import checkpoint
from bigrm.errors import CheckpointError


def fake(out, step: int, complete: bool = True, run: str = "old"):
    path = checkpoint.root(out) / checkpoint.tag(step)
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"shard")
    if complete:
        meta = {"step": step, "run": run, "world": 1, "zero_stage": 3, "files": checkpoint.manifest(path, 0)}
        (path / checkpoint.COMPLETE).write_text(json.dumps(meta))
    return path


class Engine:
    """What checkpoint.save asks of DeepSpeed's engine: one shard per save."""

    def save_checkpoint(self, root, tag, save_latest, **kwargs):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(f"weights of {tag}".encode())

    def zero_optimization_stage(self):
        return 3


def save(out, step: int, run: str, keep: int = 2) -> Path:
    return checkpoint.save(Engine(), out, {"step": step, "run": run}, keep, lambda dest: None, [])


def steps(out) -> list[int]:
    return [checkpoint.read_meta(p)["step"] for p in checkpoint.complete_checkpoints(out)]


def test_a_new_run_refuses_another_runs_checkpoints_or_deletes_them_when_told(tmp_path):
    """A second run (4 steps) into a directory holding an older run's step-10 and step-12 used to prune its own
    step-2 and step-4 and leave the old model as the newest checkpoint."""
    fake(tmp_path, 10)
    fake(tmp_path, 12)
    with pytest.raises(CheckpointError, match="another run.*--resume auto.*new train.output_dir.*overwrite_output_dir"):
        checkpoint.start("", tmp_path, overwrite=False)
    assert steps(tmp_path) == [10, 12]
    path, run = checkpoint.start("auto", tmp_path, overwrite=False)  # continuing it is fine
    assert path.name == checkpoint.tag(12) and run == "old"
    path, run = checkpoint.start("", tmp_path, overwrite=True)
    assert path is None and run != "old" and steps(tmp_path) == []


def test_pruning_removes_only_the_current_runs_checkpoints(tmp_path):
    fake(tmp_path, 10)
    fake(tmp_path, 12)  # e.g. left by an older run that this one resumed from, under another id
    for step in (2, 4, 6):
        save(tmp_path, step, "new")
    assert steps(tmp_path) == [4, 6, 10, 12]


def test_auto_takes_the_newest_complete_checkpoint(tmp_path):
    assert checkpoint.resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    fake(tmp_path, 3)
    newest = fake(tmp_path, 12)
    fake(tmp_path, 9)
    fake(tmp_path, 15, complete=False)  # a save cut short: never trusted
    assert checkpoint.resolve_resume("auto", tmp_path) == newest
    assert [checkpoint.read_meta(p)["step"] for p in checkpoint.complete_checkpoints(tmp_path)] == [3, 9, 12]


def test_explicit_path_must_be_complete(tmp_path):
    assert checkpoint.resolve_resume("", tmp_path) is None
    done = fake(tmp_path, 3)
    assert checkpoint.resolve_resume(str(done), tmp_path) == done
    with pytest.raises(CheckpointError, match="never completely written"):
        checkpoint.resolve_resume(str(fake(tmp_path, 6, complete=False)), tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        checkpoint.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_consolidation_refuses_an_incomplete_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a complete bigrm checkpoint"):
        checkpoint.consolidated_state_dict(fake(tmp_path, 3, complete=False))


KILLED_SAVE = r"""
import os, signal, sys
from pathlib import Path
from bigrm.artifacts import checkpoint

out, moment = Path(sys.argv[1]), sys.argv[2]


def sigterm(*args):
    os.kill(os.getpid(), signal.SIGTERM)  # the default action: the process ends here


class Engine:
    def save_checkpoint(self, root, tag, save_latest, **kwargs):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"half")
        if moment == "shards":
            sigterm()

    def zero_optimization_stage(self):
        return 3


if moment == "pruning":  # killed after removing one file of the checkpoint that keep=1 drops
    checkpoint.shutil.rmtree = lambda path: (next(path.glob("*.pt")).unlink(), sigterm())
checkpoint.save(Engine(), out, {"step": 6, "run": "old"}, 1, lambda dest: None, [])
"""


@pytest.mark.parametrize("moment", ["shards", "pruning"])
def test_sigterm_during_a_save_leaves_no_incomplete_checkpoint_trusted(tmp_path, moment):
    """A real SIGTERM in a process saving step 6: while writing shards (over a complete step 6 from before a resume
    from step 3), or while removing step 3 after the new checkpoint is complete."""
    fake(tmp_path, 3)
    if moment == "shards":
        fake(tmp_path, 6)
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path), moment], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    trusted = [checkpoint.read_meta(p)["step"] for p in checkpoint.complete_checkpoints(tmp_path)]
    assert trusted == ([3] if moment == "shards" else [6])


def test_a_resume_with_another_number_of_ranks_is_refused(tmp_path, monkeypatch):
    from bigrm import dist

    path = fake(tmp_path, 3)  # written by 1 rank
    monkeypatch.setattr(dist, "world", lambda: 2)
    with pytest.raises(CheckpointError, match="written by 1 ranks; resume it with the same number \\(2 now\\)"):
        checkpoint.load(engine=None, path=path)  # refused before the engine is touched


def test_manifest_names_each_file_by_the_rank_that_wrote_it(tmp_path):
    for name in ("zero_pp_rank_1_mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                 "rng-rank1.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt",
                 "hf/config.json", "verify.pt", "complete.json"):  # fmt: skip
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    assert sorted(checkpoint.manifest(tmp_path, 1)) == [
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng-rank1.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"
    ]  # fmt: skip
    assert sorted(checkpoint.manifest(tmp_path, 0)) == [
        "hf/config.json", "mp_rank_00_model_states.pt", "verify.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    ]  # fmt: skip


SHARD = "zero_pp_rank_0_mp_rank_00_model_states.pt"


@pytest.mark.parametrize(
    "harm",
    [
        ("copied", lambda f, older: f.write_bytes((older / SHARD).read_bytes()), "is not the file saved"),
        ("missing", lambda f, older: f.unlink(), "is missing"),
        ("truncated", lambda f, older: f.write_bytes(f.read_bytes()[:5]), "has 5 bytes, 24 when saved"),
    ],
    ids=lambda h: h[0],
)
def test_a_damaged_checkpoint_is_named_and_auto_falls_back_to_the_newest_that_verifies(tmp_path, capsys, harm):
    """A step-2 shard copied into step-4 (same size), a missing or a truncated shard."""
    _, damage, words = harm
    older, newest = save(tmp_path, 2, "r"), save(tmp_path, 4, "r")
    assert checkpoint.resolve_resume("auto", tmp_path) == newest
    damage(newest / SHARD, older)
    assert checkpoint.resolve_resume("auto", tmp_path) == older
    assert f"warning: not resuming from {newest}: {newest / SHARD} {words}" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=f"train.resume: {newest / SHARD} {words}"):
        checkpoint.resolve_resume(str(newest), tmp_path)  # an explicit path: no fallback
    with pytest.raises(CheckpointError, match=f"{newest / SHARD} {words}"):
        checkpoint.consolidated_state_dict(newest)  # bigrm export and scoring a checkpoint verify it too
    (older / SHARD).unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint .* verifies"):
        checkpoint.resolve_resume("auto", tmp_path)


class LoadingEngine:
    """checkpoint.load's engine: loads every file of the checkpoint as DeepSpeed's own loader does."""

    def load_checkpoint(self, root, tag, custom_load_fn=None):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        for f in sorted((Path(root) / tag).glob("*_states.pt")):
            TorchCheckpointEngine().load(str(f), map_location="cpu")
        return str(Path(root) / tag), {}


@pytest.mark.parametrize("crafted", [SHARD, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng-rank0.pt"])
def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_runs_none(tmp_path, crafted):
    """A resume of a checkpoint rewritten with a file that runs a command when unpickled (its manifest recomputed):
    DeepSpeed's loader and bigrm's RNG file both refuse it in one line; the command never runs."""
    from tests.helpers.crafted import code_pickle, remanifest

    path = fake(tmp_path, 3)
    torch.save({"module": {}}, path / SHARD)
    torch.save(checkpoint._rng_state(), path / "rng-rank0.pt")
    marker = tmp_path / "ran"
    code_pickle(path / crafted, marker, lambda payload: {"optimizer_state_dict": payload})
    remanifest(path)
    assert checkpoint.damage(path) is None  # the unkeyed manifest cannot tell
    with pytest.raises(CheckpointError, match=rf"^{path}: refused to load: a file in it would call posix.system"):
        checkpoint.load(LoadingEngine(), path)
    assert not marker.exists()


def test_a_consolidated_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path):
    """bigrm export / score of a checkpoint read every ZeRO stage's shards through DeepSpeed's zero_to_fp32."""
    from tests.helpers.crafted import code_pickle, remanifest

    marker = tmp_path / "ran"
    for stage, name in ((3, SHARD), (0, "mp_rank_00_model_states.pt")):
        path = fake(tmp_path / str(stage), 3)
        code_pickle(path / name, marker, lambda payload: {"module": payload})
        meta = checkpoint.read_meta(path)
        (path / checkpoint.COMPLETE).write_text(json.dumps({**meta, "zero_stage": stage}))
        remanifest(path)
        with pytest.raises(CheckpointError, match="refused to load: a file in it would call posix.system"):
            checkpoint.consolidated_state_dict(path)
    assert not marker.exists()


def test_safe_loading_leaves_torchs_switches_as_they_were(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.save({"x": torch.ones(2)}, tmp_path / "a.pt")
    assert checkpoint.read_pt(tmp_path / "a.pt")["x"].tolist() == [1.0, 1.0]
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


@pytest.mark.parametrize(
    "full",
    [
        (OSError(28, "No space left on device", "shard.pt"), "No space left on device \\(shard.pt\\)"),
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
            "torch could not write a file, a full disk\\?",
        ),
    ],
    ids=["python", "torch"],
)
def test_a_full_disk_while_saving_is_one_error_and_leaves_no_torn_checkpoint(tmp_path, full):
    """As Python and torch.save report ENOSPC; the older checkpoint stays the one to resume."""
    error, words = full
    older = save(tmp_path, 2, "r")

    class FullDisk(Engine):
        def save_checkpoint(self, root, tag, save_latest, **kwargs):
            super().save_checkpoint(root, tag, save_latest)
            raise error

    with pytest.raises(
        CheckpointError, match=f"^cannot write the checkpoint {tmp_path}/checkpoints/step-00000004: {words}"
    ):
        checkpoint.save(FullDisk(), tmp_path, {"step": 4, "run": "r"}, 2, lambda dest: None, [])
    assert sorted(p.name for p in checkpoint.root(tmp_path).iterdir()) == ["step-00000002"]
    assert checkpoint.resolve_resume("auto", tmp_path) == older
    with pytest.raises(ValueError, match="not a write"):  # any other failure is not hidden
        checkpoint._failed(lambda: (_ for _ in ()).throw(ValueError("not a write")))
