"""The scalar reward model: one output, the reward that ranks completions (all of it lives in kinds.base)."""

from __future__ import annotations

from bigrm.kinds.base import RewardKind


class Scalar(RewardKind):
    """A plain sequence classifier with one logit, trained by the ranking loss alone."""
