"""When a run counts as diverged (bigrm.training.divergence), and a real diverging run: it stops, exports nothing."""

from __future__ import annotations

import pytest

from bigrm.errors import Diverged
from bigrm.training.divergence import Watch


def test_only_consecutive_nonfinite_steps_stop_the_run():
    watch = Watch(3)
    seen = [False, True, True, False, True, True]
    assert [watch.observe(n, bad, False, "ckpt") for n, bad in enumerate(seen, 1)] == seen
    with pytest.raises(Diverged, match="not finite at every step from 5 to 7; the last good checkpoint is ckpt-4"):
        watch.observe(7, True, False, "ckpt-4")


def test_a_nonfinite_last_step_stops_the_run_before_its_export():
    with pytest.raises(Diverged, match="from 9 to 9"):
        Watch(3).observe(9, True, True, "ckpt")


