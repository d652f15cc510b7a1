"""An ensemble's held-out figures: AUROC against counting pairs, member and mean accuracy, the spreads' AUROC."""

from __future__ import annotations

import itertools

import pytest
import torch

from bigrm.data.labels import Labels
from bigrm.data.packing import collate
from bigrm.data.sequences import Group
from bigrm.evaluation.correlation import auroc
from bigrm.evaluation.ensemble import pair_margins, report


def slow_auroc(score: list[float], positive: list[bool]) -> float:
    pairs = [(p, n) for p, n in itertools.product(range(len(score)), repeat=2) if positive[p] and not positive[n]]
    return sum(1.0 if score[p] > score[n] else 0.5 if score[p] == score[n] else 0.0 for p, n in pairs) / len(pairs)


def test_auroc_counts_ordered_pairs_with_ties_half():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 5, (60,), generator=g).double()  # many ties
    positive = torch.rand(60, generator=g) < 0.3
    assert auroc(score, positive) == pytest.approx(slow_auroc(score.tolist(), positive.tolist()), abs=1e-12)
    assert auroc(score, torch.zeros(60, dtype=torch.bool)) is None


def test_members_mean_and_spread_over_ranked_pairs():
    import numpy as np

    groups = [
        Group((np.array([1]), np.array([2]), np.array([3])), "g0", Labels(ranks=[0, 1, 2])),
        Group((np.array([4]), np.array([5])), "g1", Labels(ranks=[1, 0])),
    ]
    labels = collate(groups, 0).labels
    values = torch.tensor([[3.0, 1.0], [2.0, 2.0], [0.0, 0.0], [0.0, 5.0], [1.0, 1.0]], dtype=torch.float64)
    margins = pair_margins(values, labels.seg_group, labels.seg_rank, labels.num_groups)
    # g0: (0 above 1), (0 above 2), (1 above 2); g1: completion 1 above completion 0
    assert sorted(map(tuple, margins.tolist())) == sorted([(1.0, -1.0), (3.0, 1.0), (2.0, 2.0), (1.0, -4.0)])
    out = report(margins)
    assert out["member_0_accuracy"] == 1.0 and out["member_1_accuracy"] == 0.5
    assert out["ensemble_mean_accuracy"] == 0.5 and out["best_member_accuracy"] == 1.0  # means 0, 2, 2, -1.5
    # std of σ(margin): wrong (mean <= 0) 0.231 and 0.357, right 0.111 and 0: every wrong pair above every right one
    assert out["spread_auroc"] == 1.0 and report(margins[:0]) == {}
    assert out["spread_mean"] == pytest.approx(float(torch.sigmoid(margins).std(1, correction=0).mean()))
    # std of the margins: wrong 1 and 2.5, right 1 and 0 → (0.5 + 1 + 1 + 1) / 4
    assert out["margin_spread_auroc"] == pytest.approx(0.875)
