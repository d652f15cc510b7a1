"""When training has diverged: a non-finite loss or gradient norm for `train.max_nonfinite_steps` steps in a row, or
(`LossRise`) a logged loss far above the run's first one.

DeepSpeed skips an optimizer step whose gradients overflow; under fp16 that is how its loss scale finds its level
(the loss itself stays finite), so such skips are only counted and logged. Without a loss scale a skipped step
means the gradients were not finite: it counts toward divergence like a non-finite loss.
"""

from __future__ import annotations

import math

from bigrm.errors import Diverged


class Watch:
    def __init__(self, limit: int):
        self.limit = limit
        self.first_bad = 0  # the first step of the current run of non-finite steps; 0 while training is healthy

    def observe(self, step: int, nonfinite: bool, last: bool, last_good: str) -> bool:
        """True while the run is unhealthy (its checkpoints must not be saved); raises Diverged after `limit`
        non-finite steps in a row, or at the last step of the run (a diverged model is not exported)."""
        if not nonfinite:
            self.first_bad = 0
            return False
        self.first_bad = self.first_bad or step
        if step - self.first_bad + 1 >= self.limit or last:
            raise Diverged(
                f"training diverged: the loss or gradient norm was not finite at every step from {self.first_bad} to "
                f"{step}; the last good checkpoint is {last_good}. Lower train.lr, check the rows' weights, margins "
                "and scores, and resume from that checkpoint with --resume PATH"
            )
        return True


class LossRise:
    """The logged training loss against the first one this process logged (all ranks log the same figures): warned once
    when it stays above WARN times that for PATIENCE logged windows in a row; Diverged past train.max_loss_ratio."""

    WARN, PATIENCE = 4.0, 2

    def __init__(self, max_ratio: float):
        self.max_ratio = max_ratio
        self.start: tuple[int, float] | None = None  # (step, loss) of the first positive finite logged loss
        self.above = 0  # logged windows in a row above WARN × start
        self.warned = False

    def observe(self, step: int, loss: float) -> str | None:
        """The warning to print, if this logged loss calls for one; raises Diverged past max_ratio."""
        if self.start is None:
            if math.isfinite(loss) and loss > 0:
                self.start = (step, loss)
            return None
        first, base = self.start
        ratio = loss / base
        said = f"the training loss {loss:.4g} at step {step} is {ratio:.3g}× its {base:.4g} at step {first}"
        if self.max_ratio and ratio > self.max_ratio:
            raise Diverged(f"training diverged: {said}, above train.max_loss_ratio={self.max_ratio:g}; lower train.lr")
        self.above = self.above + 1 if ratio > self.WARN else 0
        if self.above >= self.PATIENCE and not self.warned:
            self.warned = True
            return f"warning: {said}: lower train.lr (train.max_loss_ratio stops such a run)"
        return None
