"""The length-disentangled kind's own terms (ODIN, arXiv 2402.07319), beside the ranking loss of r_Q + r_L.

Over a micro-batch's N completions with lengths L (tokens), quality outputs r_Q and length outputs r_L:
    correlation    |ρ(r_Q, L)| − ρ(r_L, L)     ρ: Pearson, Σ(x − x̄)(y − ȳ) / sqrt(Σ(x − x̄)² Σ(y − ȳ)² + EPS)
    orthogonality  |w_Q · w_L|                 the two rows of the value head
EPS keeps the gradient finite where a micro-batch's lengths (or outputs) are all equal: ρ is then 0.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ρ(x, y) of two (N,) tensors, differentiable (0 where either is constant)."""
    dx, dy = x - x.mean(), y - y.mean()
    return (dx * dy).sum() / torch.sqrt((dx * dx).sum() * (dy * dy).sum() + EPS)


def length_terms(outputs: torch.Tensor, lengths: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """(3,): ρ(r_Q, L), ρ(r_L, L) and |w_Q · w_L| (0 without the head's Gram matrix `gram`, (2, 2)), from (N, 2)
    outputs (quality, length) and (N,) lengths."""
    lengths = lengths.to(outputs.dtype)
    dot = gram[0, 1].abs() if gram is not None else outputs.new_zeros(())
    return torch.stack([pearson(outputs[:, 0], lengths), pearson(outputs[:, 1], lengths), dot])


def length_loss(terms: torch.Tensor, length_coef: float, orthogonal_coef: float) -> torch.Tensor:
    """length_coef · (|ρ_Q| − ρ_L) + orthogonal_coef · |w_Q · w_L| from length_terms."""
    return length_coef * (terms[0].abs() - terms[1]) + orthogonal_coef * terms[2]
