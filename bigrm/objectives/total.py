"""What training minimises: the ranking loss plus the step and rating terms of the rows that carry them, each
normalised over a whole optimizer update (`Normaliser`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from bigrm.config import LossConfig
from bigrm.data.packing import SegmentLabels
from bigrm.data.sequences import Group
from bigrm.model.heads import AttributeHead
from bigrm.objectives import ratings
from bigrm.objectives.ranking import Stats, denominators, ranking_loss
from bigrm.objectives.steps import step_denominator, step_loss


@dataclass(frozen=True)
class Normaliser:
    """The denominators of an update's loss terms, from labels alone: the trainer sums each prompt's (`of`) over the
    update, so the micro-batches and ranks that hold parts of it add up to the update's loss."""

    weight_sum: float = 0.0  # ranking: Σ w over ranked prompts
    unit_sum: float = 0.0  # ranking: Σ w·units (pairs, or listmle's completions)
    step_weight_sum: float = 0.0  # PRM steps: Σ w over the steps trained on
    rating_sums: np.ndarray | None = None  # attribute heads: (A,) Σ w over each attribute's present ratings

    @staticmethod
    def of(group: Group, cfg: LossConfig, rated: bool = False) -> Normaliser:
        """One prompt's share; `rated`: the model has an attribute head."""
        weight_sum, unit_sum = denominators([group], cfg)
        rating = ratings.rating_sums(group) if rated else None
        return Normaliser(weight_sum, unit_sum, step_denominator(group, cfg), rating)

    def __add__(self, other: Normaliser) -> Normaliser:
        rating = None if self.rating_sums is None else self.rating_sums + other.rating_sums
        return Normaliser(
            self.weight_sum + other.weight_sum,
            self.unit_sum + other.unit_sum,
            self.step_weight_sum + other.step_weight_sum,
            rating,
        )

    def __radd__(self, other: int) -> Normaliser:  # sum() starts from 0
        return self if other == 0 else NotImplemented


def total_loss(
    values: torch.Tensor,
    labels: SegmentLabels,
    cfg: LossConfig,
    norm: Normaliser | None = None,
    head: AttributeHead | None = None,
) -> tuple[torch.Tensor, Stats, torch.Tensor | None]:
    """(loss, stats, rating sums): what training minimises, for a micro-batch, with the optimizer update's
    denominators (`norm`; default: this micro-batch's own).
    Scalar heads, values (N + P,) (rewards, then values at step ends): the ranking loss plus loss.step_coef times the
    step loss (bigrm.objectives.steps); rating sums None.
    Attribute heads (`head`, values (N, A)): ranking_loss of the scalar head.scalar(values) plus loss.attribute_coef
    times the rating term (bigrm.objectives.ratings), and the (2, A) float64
    sums that bigrm.evaluation.ratings.train_metrics logs. Stepwise rows never reach an attribute head
    (config.STEPS_WITH_ATTRIBUTES)."""
    if head is not None:
        outputs = values.double() if values.dtype == torch.float64 else values.float()  # (N, A)
        loss, stats = ranking_loss(head.scalar(outputs), labels, cfg, *_ranking_sums(norm))
        if labels.num_groups == 0:  # placeholder micro-batch (see ranking_loss)
            return loss, stats, torch.zeros(2, len(head.names), dtype=torch.float64, device=values.device)
        sq_err, weights = ratings.rating_terms(outputs, labels, head)
        denominator = weights if norm is None else torch.as_tensor(norm.rating_sums).to(outputs)
        loss = loss + cfg.attribute_coef * ratings.rating_loss(sq_err, denominator)
        return loss, stats, torch.stack([sq_err, weights]).detach().double()
    n = len(labels.seg_group)
    loss, stats = ranking_loss(values[:n], labels, cfg, *_ranking_sums(norm))
    if labels.num_steps:
        step, sums = step_loss(values[n:], labels, cfg, None if norm is None else norm.step_weight_sum)
        loss = loss + cfg.step_coef * step
        stats = replace(stats, **sums)
    return loss, stats, None


def _ranking_sums(norm: Normaliser | None) -> tuple[float | None, float | None]:
    return (None, None) if norm is None else (norm.weight_sum, norm.unit_sum)
