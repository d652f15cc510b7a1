"""The trainer's own wording (its phases run in tests/runs)."""

from __future__ import annotations

from pathlib import Path

from bigrm.data.packing import Update
from bigrm.training.trainer import resumed_line


def test_a_resume_numbers_steps_once_as_the_logs_do():
    updates = [Update([], 1, epoch, index) for epoch in range(2) for index in range(3)]
    step = Path("out/checkpoints/step-00000005")
    assert resumed_line(step, 5, updates) == (
        f"resumed from {step} at step 5: 5 of 6 optimizer steps done, 2 of them in epoch 2; continuing with step 6"
    )
    assert resumed_line(step, 6, updates).endswith("6 of 6 optimizer steps done, 3 of them in epoch 2; none left")
