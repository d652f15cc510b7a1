"""An ensemble's loss: the sum over its M members of each member's ranking loss on its own bootstrap sample.

Member m weighs prompt g by b_mg ~ Poisson(1) (the online bootstrap: g appears b_mg times in m's resample), drawn
from (m, the prompt's source) alone, so every rank and every epoch gives a prompt the same weights:
    L = Σ_m  ranking_loss(r_m; weights w_g·b_mg, denominators Σ_g w_g·b_mg (and Σ_g w_g·b_mg·units_g) over the update)
Without bootstrap b = 1: the members differ by their initialisation alone.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from bigrm.config import LossConfig
from bigrm.data.packing import SegmentLabels
from bigrm.objectives.ranking import ranking_loss

PRIME = 2_147_483_647  # 2^31 - 1: products of two residues stay below 2^62, exact in int64 on every device
ROUNDS = ((48_271, 11), (69_621, 97_003), (16_807, 7_919))  # (multiplier, increment) of each mixing round
# P(K <= k) for K ~ Poisson(1), k = 0..11 (P(K > 11) < 1e-9: the rare draw past it counts as 12)
POISSON_CDF = np.cumsum([np.exp(-1.0) / float(np.prod(np.arange(1, k + 1))) for k in range(12)])


def uniform(group_id: torch.Tensor, member: int) -> torch.Tensor:
    """(G,) in [0, 1): a hash of each prompt's id and the member, the same on every device."""
    x = (group_id.long() + member * 1_000_003) % PRIME
    for multiplier, increment in ROUNDS:
        x = (x * multiplier + increment) % PRIME
        x = x ^ (x >> 13)
    return x.double() / PRIME


def bootstrap_weights(group_id: torch.Tensor, members: int) -> torch.Tensor:
    """(M, G) float64 Poisson(1) counts of each prompt in each member's resample."""
    cdf = torch.as_tensor(POISSON_CDF, dtype=torch.float64, device=group_id.device)
    return torch.stack([torch.searchsorted(cdf, uniform(group_id, m), right=True).double() for m in range(members)])


def member_losses(
    values: torch.Tensor,
    labels: SegmentLabels,
    cfg: LossConfig,
    boot: torch.Tensor,
    denominators: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """((M,) each member's ranking loss, (M,) its correctly ordered pairs) from (N, M) rewards, (M, G) bootstrap
    weights and the update's (2, M) denominators (Σ w·b, Σ w·b·units; None: the micro-batch's own)."""
    losses, correct = [], []
    for m in range(values.shape[1]):
        weighted = replace(labels, group_weight=labels.group_weight * boot[m].to(labels.group_weight))
        sums = (None, None) if denominators is None else (float(denominators[0, m]), float(denominators[1, m]))
        loss, stats = ranking_loss(values[:, m], weighted, cfg, *sums)
        losses.append(loss)
        correct.append(stats.correct_pairs)
    return torch.stack(losses), torch.stack(correct)
