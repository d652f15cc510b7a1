"""Rank statistics the evaluation reports share: average ranks, Pearson and Spearman correlation."""

from __future__ import annotations

import torch


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """(N,) float64 ranks 1..N, tied values sharing their average rank."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()  # rank of the last copy of each distinct value
    return ((last - counts + 1 + last) / 2)[inverse]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """None when a side is constant: it has no correlation."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.square().sum() * b.square().sum()).sqrt()
    return None if denom == 0 else float((a * b).sum() / denom)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    return pearson(average_ranks(a), average_ranks(b))


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float | None:
    """The probability that a positive's score exceeds a negative's (ties count half): the Mann–Whitney U over both
    counts; None without both classes."""
    pos = int(positive.sum())
    neg = len(positive) - pos
    if not pos or not neg:
        return None
    ranks = average_ranks(score.double())
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))
