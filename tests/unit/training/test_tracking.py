"""log.jsonl across a resume: each step once."""

from __future__ import annotations

import json

from bigrm.training.tracking import Tracker


def test_a_resume_drops_the_rows_of_the_steps_it_retakes(tmp_path):
    """Killed after logging steps 1-5 with a checkpoint at step 3: the resumed run logs 4 and 5 again."""
    first = Tracker(tmp_path, 10, sinks=[])
    first.record("setup", {"world": 1})
    for step in range(1, 6):
        first.log("train", {"loss": 1.0 / step, "pairwise_accuracy": 0.5}, step)
    first.log("eval", {"loss": 0.1}, 5)
    first.close()
    resumed = Tracker(tmp_path, 10, sinks=[])
    resumed.drop_after(3)
    for step in range(4, 7):
        resumed.log("train", {"loss": 2.0, "pairwise_accuracy": 0.5}, step)
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["split"] for r in rows].count("eval") == 0 and rows[0]["split"] == "setup"
    assert [r["loss"] for r in rows if r["split"] == "train"][3:] == [2.0, 2.0, 2.0]
