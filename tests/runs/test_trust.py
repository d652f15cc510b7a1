"""Real one-rank DeepSpeed runs against crafted and unusable artifacts: a checkpoint rewritten to run code, and
output paths that cannot be written, each refused in one line without running or losing anything."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.crafted import code_pickle, remanifest
from tests.helpers.paths import REPO
from tests.helpers.runs import ENV, SMALL, command, launch

pytestmark = pytest.mark.slow
ARGS = [*SMALL, "--max_steps", "4", "--save_every", "2", "--data.synthetic.num_train", "120"]
BIGRM = [sys.executable, "-c", "import sys; from bigrm.cli import main; sys.exit(main())"]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_state_loads_as_tensors_only_and_a_crafted_one_runs_nothing(tmp_path, stage):
    """Resume and `bigrm export` go through DeepSpeed's own loaders (weights_only=False there) under bigrm's
    tensors-only switch: real checkpoints of every ZeRO stage still load; one whose optimizer state (manifest
    recomputed) would run a command is refused in one line and the command never runs."""
    out, args = tmp_path / "run", [*ARGS, "--deepspeed_config", f"ds_configs/zero{stage}.json", "--export", "false"]
    launch(1, out, *args)
    step2, step4 = out / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000004"
    assert "resumed from" in launch(1, out, *args, "--resume", str(step2)).stdout
    exported = run([*BIGRM, "export", "--checkpoint", str(step4), "--out", str(tmp_path / "export")])
    assert exported.returncode == 0, exported.stderr[-3000:]

    marker = tmp_path / "ran"
    state = next(step4.glob("*optim_states.pt"), None) or step4 / "mp_rank_00_model_states.pt"
    code_pickle(state, marker, lambda payload: {"optimizer_state_dict": payload})
    remanifest(step4)
    proc = run(command(1, out, *args, "--resume", "auto"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors(proc) == [
        f"error: {step4}: refused to load: a file in it would call posix.system (a checkpoint may run no code)"
    ]
    assert not marker.exists()


def test_an_export_destination_taken_by_a_file_stops_the_run_before_training(tmp_path):
    """It used to train fully, then lose the model at export."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "final").write_text("not a directory")
    proc = run(command(1, out, *ARGS))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors(proc) == [
        f"error: train.export: {out / 'final'} exists and is not a directory: give a directory to export to"
    ]
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


def test_bigrm_export_of_the_last_checkpoint_carries_the_reward_statistics_of_final(tmp_path):
    """OpenRLHF's normalize_reward reads `mean` / `std`: `bigrm export` used to drop them."""
    out = tmp_path / "run"
    launch(1, out, *ARGS)
    last = out / "checkpoints" / "step-00000004"
    exported = run([*BIGRM, "export", "--checkpoint", str(last), "--out", str(tmp_path / "again")])
    assert exported.returncode == 0, exported.stderr[-3000:]
    final, again = (json.loads((d / "config.json").read_text()) for d in (out / "final", tmp_path / "again"))
    keys = ("mean", "std", "bigrm_reward_mean", "bigrm_reward_std")
    assert [again[k] for k in keys] == [final[k] for k in keys] and final["std"] > 0
    assert (out / "final" / "bigrm_export.json").is_file() and (tmp_path / "again" / "bigrm_export.json").is_file()


def test_a_resume_that_changes_the_learning_rate_is_refused_unless_overridden(tmp_path):
    """It used to continue with the new lr, exit 0, no word, and config.yaml then recorded it for the whole run."""
    out, args = tmp_path / "run", [*ARGS, "--deepspeed_config", "ds_configs/zero0.json", "--export", "false"]
    launch(1, out, *args)
    step2 = out / "checkpoints" / "step-00000002"
    recorded = (out / "config.yaml").read_text()
    proc = run(command(1, out, *args, "--resume", str(step2), "--lr", "1e-2", "--loss.objective", "listmle"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors(proc) == [
        f"error: cannot resume {step2}: train.lr 0.003 → 0.01; loss.objective 'pairwise' → 'listmle' would change "
        "what shapes the optimisation mid-run; keep the checkpoint's values, or name the options in "
        "train.resume_override to continue with the new ones"
    ]
    assert (out / "config.yaml").read_text() == recorded
    resumed = launch(1, out, *args, "--resume", str(step2), "--lr", "1e-2", "--resume_override", "[train.lr]")
    assert "resume: train.lr 0.003 → 0.01 from here on (train.resume_override)" in resumed.stdout
    assert "lr: 0.01" in (out / "config.yaml").read_text()
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["changes"] for r in rows if r["split"] == "resume"] == [
        ["resume: train.lr 0.003 → 0.01 from here on (train.resume_override)"]
    ]
