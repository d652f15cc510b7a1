"""What a prompt's completions are trained toward."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Labels:
    """What a prompt's completions are trained toward, declared once: Example and sequences.Group carry it, and
    packing.collate lays it out per segment (packing.SegmentLabels) for the loss."""

    ranks: tuple[int, ...] = ()  # per completion, 0 = best; equal ranks are ties; empty means 0..K-1; -1: unranked
    scores: tuple[float, ...] | None = None  # scored rows: the raw scores
    targets: tuple[float, ...] | None = None  # scored rows: scores standardised over their file
    margin: float = 0.0  # subtracted inside every pair's loss
    weight: float = 1.0  # the prompt's share of the loss
    # with data.attributes: per completion, its rating of each attribute in data.attributes' order, NaN = missing
    attributes: tuple[tuple[float, ...], ...] | None = None
    # stepwise groups (ranks all -1): per completion, each step's label in [0, 1] and the row's weight
    steps: tuple[tuple[float, ...], ...] | None = None
    step_weights: tuple[float, ...] | None = None

    @property
    def ranked(self) -> bool:
        """Whether the completions are compared with each other (stepwise solutions never are)."""
        return not self.ranks or self.ranks[0] >= 0
