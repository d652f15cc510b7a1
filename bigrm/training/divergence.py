"""When training has diverged: a non-finite loss or gradient norm for `train.max_nonfinite_steps` steps in a row.

DeepSpeed skips an optimizer step whose gradients overflow; under fp16 that is how its loss scale finds its level
(the loss itself stays finite), so such skips are only counted and logged. Without a loss scale a skipped step
means the gradients were not finite: it counts toward divergence like a non-finite loss.
"""

from __future__ import annotations

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
