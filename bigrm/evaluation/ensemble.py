"""An ensemble's held-out figures: each member's and the mean's pairwise accuracy, and how well the members' spread
over a pair predicts that the mean ranks it wrongly.

For a ranked pair (i above j) member m's margin is d_m = r_mi - r_mj and its preference p_m = σ(d_m), the
Bradley–Terry probability that i is better; the pair is wrongly ranked when the mean margin is not positive. Its
spread is the std over members (ddof 0) of p_m: `spread_auroc` is the AUROC of that spread as a predictor of a wrong
ranking (0.5: no better than chance). `margin_spread_auroc` is the same for the std of the raw margins d_m, which
grows with the margins' size (members that agree a pair is easy differ most in how easy).
"""

from __future__ import annotations

import torch

from bigrm.evaluation.correlation import auroc
from bigrm.objectives.ranking import pair_grid


def pair_margins(values: torch.Tensor, seg_group: torch.Tensor, seg_rank: torch.Tensor, groups: int) -> torch.Tensor:
    """(pairs, M) float64 every member's margin over each ranked pair, from (N, M) rewards of `groups` prompts."""
    values = values.double()
    grids = [pair_grid(values[:, m], seg_group, seg_rank, groups) for m in range(values.shape[1])]
    if not grids or not groups:
        return torch.zeros(0, values.shape[1], dtype=torch.float64)
    valid = grids[0].valid
    return torch.stack([g.diff[valid] for g in grids], 1)


def report(margins: torch.Tensor) -> dict[str, float]:
    """The figures of (pairs, M) margins (pair_margins of every held-out prompt)."""
    if not len(margins):
        return {}
    mean, spread = margins.mean(1), torch.sigmoid(margins).std(1, correction=0)
    out = {f"member_{m}_accuracy": float((margins[:, m] > 0).double().mean()) for m in range(margins.shape[1])}
    out["ensemble_mean_accuracy"] = float((mean > 0).double().mean())
    out["best_member_accuracy"] = max(out[f"member_{m}_accuracy"] for m in range(margins.shape[1]))
    out["spread_mean"] = float(spread.mean())
    for name, score in (("spread_auroc", spread), ("margin_spread_auroc", margins.std(1, correction=0))):
        found = auroc(score, mean <= 0)
        if found is not None:
            out[name] = found
    return out
