"""The denominators of an update's loss terms, from labels alone (`Normaliser`).

The trainer sums each prompt's share (a reward kind's `share`) over the optimizer update, so the micro-batches and
ranks that hold parts of it add up to the update's loss: every kind's ranking loss reads the ranking sums, and a
kind with a term of its own (PRM steps, attribute ratings) keeps that term's denominators in `term`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bigrm.config import LossConfig
from bigrm.data.sequences import Group
from bigrm.objectives.ranking import denominators


@dataclass(frozen=True)
class Normaliser:
    weight_sum: float = 0.0  # ranking: Σ w over ranked prompts
    unit_sum: float = 0.0  # ranking: Σ w·units (pairs, or listmle's completions)
    term: np.ndarray | None = None  # the kind's own term: its denominators (float64), summed elementwise

    @staticmethod
    def ranking(group: Group, cfg: LossConfig) -> Normaliser:
        """One prompt's share of the ranking sums."""
        return Normaliser(*denominators([group], cfg))

    @staticmethod
    def ranking_sums(norm: Normaliser | None) -> tuple[float | None, float | None]:
        """ranking_loss's denominators: the update's, or (None: a micro-batch's own) none."""
        return (None, None) if norm is None else (norm.weight_sum, norm.unit_sum)

    def __add__(self, other: Normaliser) -> Normaliser:
        term = None if self.term is None else self.term + other.term
        return Normaliser(self.weight_sum + other.weight_sum, self.unit_sum + other.unit_sum, term)

    def __radd__(self, other: int) -> Normaliser:  # sum() starts from 0
        return self if other == 0 else NotImplemented
