"""When a run counts as diverged (bigrm.training.divergence), and a real diverging run: it stops, exports nothing."""

from __future__ import annotations

import pytest

from bigrm.errors import Diverged
from bigrm.training.divergence import LossRise, Watch


def test_only_consecutive_nonfinite_steps_stop_the_run():
    watch = Watch(3)
    seen = [False, True, True, False, True, True]
    assert [watch.observe(n, bad, False, "ckpt") for n, bad in enumerate(seen, 1)] == seen
    with pytest.raises(Diverged, match="not finite at every step from 5 to 7; the last good checkpoint is ckpt-4"):
        watch.observe(7, True, False, "ckpt-4")


def test_a_nonfinite_last_step_stops_the_run_before_its_export():
    with pytest.raises(Diverged, match="from 9 to 9"):
        Watch(3).observe(9, True, True, "ckpt")


def test_a_loss_far_above_its_start_is_warned_once():
    rise = LossRise(0.0)
    said = [rise.observe(n, loss) for n, loss in [(10, 8.6), (20, 40.0), (30, 2.0), (40, 40.0), (50, 412.0), (60, 500)]]
    assert said[:4] == [None, None, None, None]  # one window above 4× is not yet a trend
    assert said[4] == (
        "warning: the training loss 412 at step 50 is 47.9× its 8.6 at step 10: lower train.lr "
        "(train.max_loss_ratio stops such a run)"
    )
    assert said[5] is None


def test_max_loss_ratio_stops_the_run():
    rise = LossRise(10.0)
    rise.observe(1, float("nan"))  # no start to compare with yet
    rise.observe(2, 0.7)
    assert rise.observe(3, 6.9) is None
    with pytest.raises(Diverged, match=r"loss 7.1 at step 4 is 10.1× its 0.7 at step 2, above train.max_loss_ratio=10"):
        rise.observe(4, 7.1)
