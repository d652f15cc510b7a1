"""When a run counts as diverged (bigrm.training.divergence), and a real diverging run: it stops, exports nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import REPO


@pytest.mark.slow
def test_a_diverging_run_stops_with_the_last_good_checkpoint_and_no_export(tmp_path):
    """lr 1e30: the loss turns NaN after a few steps; the run used to log "OVERFLOW! Skipping step" at every step,
    exit 0 and export an untrained final/."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--output_dir", str(out), "--max_steps", "10",
         "--data.synthetic.num_train", "120", "--data.synthetic.num_eval", "16", "--max_tokens_per_batch", "400",
         "--report_to", "none", "--save_every", "1", "--lr", "1e30", "--warmup_ratio", "0", "--grad_clip", "0",
         "--max_nonfinite_steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error: training diverged"))
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert f"the last good checkpoint is {out / 'checkpoints' / saved[-1]}." in error
    first_bad, last_bad = (int(n) for n in error.split("at every step from ")[1].split(";")[0].split(" to "))
    assert last_bad - first_bad + 1 == 2 and last_bad < 10  # train.max_nonfinite_steps, not the default nor the end
    assert int(saved[-1].removeprefix("step-")) == first_bad - 1  # no step of the diverged stretch was saved
    assert not (out / "final").exists() and not (out / "metrics.json").exists()
