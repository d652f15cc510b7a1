"""The rating term of a multi-attribute head (bigrm.model.heads), over an optimizer step:
    (1/A) Σ_a  Σ_{present ratings i of a} w_g(i) (v_ia - t_ia)²  /  Σ_{present ratings i of a} w_g(i)
with w_g(i) the weight of completion i's row; a missing rating (NaN) is masked out of both sums, and an attribute
with no rating in the step adds 0. The step's denominators come from labels alone (`rating_sums`), like the ranking
loss's (bigrm.objectives.ranking.denominators); the attributes kind (bigrm.kinds.attributes) adds the term, times
loss.attribute_coef.
"""

from __future__ import annotations

import numpy as np
import torch

from bigrm.data.packing import SegmentLabels
from bigrm.data.sequences import Group
from bigrm.model.heads import AttributeHead


def rating_sums(group: Group) -> np.ndarray:
    """(A,) Σ of the group's weight over its present ratings of each attribute: its share of the step's denominators."""
    ratings = np.asarray(group.labels.attributes, dtype=np.float64)  # (K, A)
    return group.labels.weight * (~np.isnan(ratings)).sum(0)


def rating_terms(values: torch.Tensor, labels: SegmentLabels, head: AttributeHead) -> tuple[torch.Tensor, torch.Tensor]:
    """(A,) Σ w_g (v - t)² over each attribute's present ratings, and (A,) Σ w_g over them."""
    ratings = labels.seg_attributes.to(values.dtype)  # (N, A) NaN where missing
    present = ~torch.isnan(ratings)
    w = labels.group_weight.to(values.dtype)[labels.seg_group][:, None].expand_as(ratings)  # (N, A) its row's weight
    err = (values - head.targets(ratings).nan_to_num(0.0)).square()
    return torch.where(present, w * err, 0.0).sum(0), torch.where(present, w, 0.0).sum(0)


def rating_loss(sq_err: torch.Tensor, weight_sums: torch.Tensor) -> torch.Tensor:
    """The rating term from rating_terms' (A,) sums over the step (denominators: the step's rating_sums)."""
    return (sq_err / weight_sums.clamp(min=1e-12)).mean()
