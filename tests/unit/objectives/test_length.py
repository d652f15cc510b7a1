"""The length-disentangled kind's terms against a slow float64 reference (plain Python sums)."""

from __future__ import annotations

import math

import pytest
import torch

from bigrm.objectives.length import EPS, length_loss, length_terms, pearson


def slow_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return cov / math.sqrt(vx * vy + EPS)


def slow_loss(outputs: list[list[float]], lengths: list[int], w: list[list[float]], cl: float, co: float) -> float:
    rho_q = slow_pearson([o[0] for o in outputs], [float(n) for n in lengths])
    rho_l = slow_pearson([o[1] for o in outputs], [float(n) for n in lengths])
    dot = sum(a * b for a, b in zip(w[0], w[1], strict=True))
    return cl * (abs(rho_q) - rho_l) + co * abs(dot)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_terms_equal_the_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    outputs = torch.randn(9, 2, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 40, (9,), generator=g)
    weight = torch.randn(2, 5, generator=g, dtype=torch.float64)
    terms = length_terms(outputs, lengths, weight @ weight.T)
    got = length_loss(terms, 0.7, 1.3).item()
    want = slow_loss(outputs.tolist(), lengths.tolist(), weight.tolist(), 0.7, 1.3)
    assert got == pytest.approx(want, abs=1e-10, rel=0)
    assert terms[0].item() == pytest.approx(slow_pearson(outputs[:, 0].tolist(), lengths.double().tolist()), abs=1e-10)


def test_without_the_gram_matrix_the_orthogonality_term_is_zero():
    outputs, lengths = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, -1.0]], dtype=torch.float64), torch.tensor([3, 9, 1])
    terms = length_terms(outputs, lengths, None)
    assert terms[2].item() == 0.0 and terms[1].item() == pytest.approx(slow_pearson([2, 5, -1], [3, 9, 1]), abs=1e-10)


def test_constant_lengths_give_zero_correlation_and_finite_gradients():
    outputs = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    loss = length_loss(length_terms(outputs, torch.full((4,), 7), None), 1.0, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(outputs.grad).all()
    assert pearson(torch.ones(3), torch.arange(3.0)).item() == 0.0


def test_the_gradient_pushes_the_quality_output_away_from_length_and_the_length_output_towards_it():
    lengths = torch.tensor([1, 2, 3, 4])
    outputs = torch.tensor([[0.1, 0.0], [0.3, 0.1], [0.2, 0.0], [0.5, 0.2]], dtype=torch.float64, requires_grad=True)
    before = length_terms(outputs, lengths, None)
    length_loss(before, 1.0, 0.0).backward()
    with torch.no_grad():
        after = length_terms(outputs - 0.1 * outputs.grad, lengths, None)
    assert abs(after[0]) < abs(before[0]) and after[1] > before[1]
