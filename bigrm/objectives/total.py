"""What training minimises: the ranking loss plus the step and rating terms of the rows that carry them."""

from __future__ import annotations

from dataclasses import replace

import torch

from bigrm.config import LossConfig
from bigrm.data.packing import SegmentLabels
from bigrm.model.heads import AttributeHead
from bigrm.objectives import ratings
from bigrm.objectives.ranking import Stats, ranking_loss
from bigrm.objectives.steps import step_loss


def total_loss(
    values: torch.Tensor,
    labels: SegmentLabels,
    cfg: LossConfig,
    weight_sum: float | None = None,
    unit_sum: float | None = None,
    step_weight_sum: float | None = None,
    head: AttributeHead | None = None,
    rating_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats, torch.Tensor | None]:
    """(loss, stats, rating sums): what training minimises, for a micro-batch, with the optimizer step's
    denominators (`denominators`; default: this micro-batch's own).
    Scalar heads, values (N + P,) (rewards, then values at step ends): the ranking loss plus loss.step_coef times the
    step loss (bigrm.objectives.steps); rating sums None.
    Attribute heads (`head`, values (N, A)): ranking_loss of the scalar head.scalar(values) plus loss.attribute_coef
    times the rating term (bigrm.model.heads; `rating_sums`: the step's (A,) denominators), and the (2, A) float64
    sums that bigrm.evaluation.ratings.train_metrics logs. Stepwise rows never reach an attribute head
    (config.STEPS_WITH_ATTRIBUTES)."""
    if head is not None:
        outputs = values.double() if values.dtype == torch.float64 else values.float()  # (N, A)
        loss, stats = ranking_loss(head.scalar(outputs), labels, cfg, weight_sum, unit_sum)
        if labels.num_groups == 0:  # placeholder micro-batch (see ranking_loss)
            return loss, stats, torch.zeros(2, len(head.names), dtype=torch.float64, device=values.device)
        sq_err, weights = ratings.rating_terms(outputs, labels, head)
        denominator = weights if rating_sums is None else rating_sums.to(outputs)
        loss = loss + cfg.attribute_coef * ratings.rating_loss(sq_err, denominator)
        return loss, stats, torch.stack([sq_err, weights]).detach().double()
    n = len(labels.seg_group)
    loss, stats = ranking_loss(values[:n], labels, cfg, weight_sum, unit_sum)
    if labels.num_steps:
        step, sums = step_loss(values[n:], labels, cfg, step_weight_sum)
        loss = loss + cfg.step_coef * step
        stats = replace(stats, **sums)
    return loss, stats, None
