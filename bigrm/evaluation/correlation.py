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
