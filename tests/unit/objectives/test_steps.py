"""The step loss (bigrm.objectives.steps) and step metrics against plain Python loops, and their place in the loss."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from bigrm.config import LossConfig
from bigrm.data.labels import Labels
from bigrm.data.packing import SegmentLabels
from bigrm.data.sequences import Group
from bigrm.evaluation.steps import auroc, step_report
from bigrm.kinds import Steps
from bigrm.objectives.ranking import denominators, metrics, ranking_loss
from bigrm.objectives.steps import step_denominator, step_loss


def stepwise(rng: random.Random, k: int) -> Labels:
    """k solutions of 1-5 steps with hard and soft labels and row weights."""
    steps = tuple(
        tuple(rng.choice([0.0, 1.0, round(rng.random(), 2)]) for _ in range(rng.randint(1, 5))) for _ in range(k)
    )
    return Labels((-1,) * k, steps=steps, step_weights=tuple(rng.choice([1.0, 0.5, 3.0]) for _ in range(k)))


def reference(values: list[float], labels: list[Labels], last_only: bool) -> torch.Tensor:
    """Σ w·BCE / Σ w, one step at a time."""
    num, den, at = 0.0, 0.0, 0
    for lab in labels:
        for steps, w in zip(lab.steps, lab.step_weights, strict=True):
            for i, y in enumerate(steps):
                if not last_only or i == len(steps) - 1:
                    p = torch.sigmoid(values[at])
                    num = num - w * (y * torch.log(p) + (1 - y) * torch.log(1 - p))
                    den += w
                at += 1
    return num / den


@pytest.mark.parametrize("last_only", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_step_loss_and_gradients_equal_a_python_loop(last_only, seed):
    rng = random.Random(seed)
    labels = [stepwise(rng, rng.randint(1, 3)) for _ in range(6)]
    ks = [len(lab.steps) for lab in labels]
    seg = SegmentLabels.of(labels, ks, torch.float64)
    n_steps = sum(len(s) for lab in labels for s in lab.steps)
    values = torch.randn(n_steps, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3
    cfg = LossConfig(train_on_last_step_only=last_only)

    got_v = values.clone().requires_grad_()
    got, sums = step_loss(got_v, seg, cfg)
    got.backward()
    ref_v = values.clone().requires_grad_()
    ref = reference(list(ref_v.unbind()), labels, last_only)
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), abs=1e-12)
    assert torch.allclose(got_v.grad, ref_v.grad, atol=1e-12)
    # the optimizer step's denominator, known from the labels alone, gives the same loss
    groups = [Group(tuple(np.zeros(1) for _ in range(k)), "", lab) for lab, k in zip(labels, ks, strict=True)]
    total = sum(step_denominator(g, cfg) for g in groups)
    assert total == pytest.approx(sums["step_weight_sum"].item())
    assert step_loss(values, seg, cfg, total)[0].item() == pytest.approx(ref.item(), abs=1e-12)


def test_stepwise_solutions_are_never_ranked_and_the_step_loss_adds_with_its_coefficient():
    """Mixed micro-batch: ranked prompts keep exactly their ranking loss (tie, centering and L2 terms included);
    stepwise solutions add only step_coef times the step loss, whatever their final-token rewards."""
    rng = random.Random(3)
    ranked = [Labels((0, 1, 1, 2)), Labels((0, 1), weight=2.0)]
    steps = [stepwise(rng, 3), stepwise(rng, 1)]
    mixed = [steps[0], ranked[0], steps[1], ranked[1]]
    ks = [3, 4, 1, 2]
    cfg = LossConfig(tie_coef=0.5, center_rewards_coef=0.1, l2_rewards_coef=0.2, step_coef=0.7)
    rewards = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    n_steps = sum(len(s) for lab in steps for s in lab.steps)
    at_steps = torch.randn(n_steps, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    got, stats, _ = Steps().loss(torch.cat([rewards, at_steps]), SegmentLabels.of(mixed, ks, torch.float64), cfg, None)
    ranked_rewards = torch.cat([rewards[3:7], rewards[8:10]])
    alone, _ = ranking_loss(ranked_rewards, SegmentLabels.of(ranked, [4, 2], torch.float64), cfg)
    assert got.item() == pytest.approx(alone.item() + 0.7 * reference(list(at_steps), steps, False).item(), abs=1e-12)
    # the statistics count ranked prompts only, and the steps
    logged = metrics(stats, cfg)
    assert logged["num_prompts"] == 2 and logged["num_pairs"] == 5 + 1  # ranks 0,1,1,2 and 0,1
    assert logged["num_steps"] == n_steps
    assert logged["reward_mean"] == pytest.approx(ranked_rewards.mean().item())
    assert logged["loss"] == pytest.approx(got.item(), abs=1e-12)
    # the step's ranking denominators leave stepwise prompts out
    groups = [Group(tuple(np.zeros(1) for _ in range(k)), "", lab) for lab, k in zip(mixed, ks, strict=True)]
    assert denominators(groups, cfg) == denominators([groups[1], groups[3]], cfg)


def test_stepwise_only_batches_have_no_ranking_figures():
    labels = [stepwise(random.Random(0), 2)]
    n = sum(len(s) for s in labels[0].steps)
    values, labels = torch.zeros(2 + n, dtype=torch.float64), SegmentLabels.of(labels, [2])
    loss, stats, _ = Steps().loss(values, labels, LossConfig(), None)
    assert loss.item() == pytest.approx(math.log(2))
    assert set(metrics(stats, LossConfig())) == {"loss", "step_loss", "step_accuracy", "num_steps"}


def first_error_reference(flags: list[bool]) -> int:
    return next((i for i, f in enumerate(flags) if f), -1)


def test_step_report_equals_python_loops():
    rng = random.Random(5)
    solutions = [[rng.random() < 0.7 for _ in range(rng.randint(1, 6))] for _ in range(60)]
    labels = [float(c) for s in solutions for c in s]
    values = [round(rng.gauss(1.0 if y else -0.5, 1.0), 1) for y in labels]  # rounded: tied scores
    ids = [i * 3 for i, s in enumerate(solutions) for _ in s]  # any increasing ids
    got = step_report(torch.tensor(values), torch.tensor(labels), torch.tensor(ids))

    right = sum((v >= 0) == (y >= 0.5) for v, y in zip(values, labels, strict=True))
    assert got["step_accuracy"] == pytest.approx(right / len(values))
    pos = [v for v, y in zip(values, labels, strict=True) if y]
    neg = [v for v, y in zip(values, labels, strict=True) if not y]
    pairs = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    assert got["step_auroc"] == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)
    tp = sum(v < 0 and not y for v, y in zip(values, labels, strict=True))
    fp = sum(v < 0 and y for v, y in zip(values, labels, strict=True))
    fn = sum(v >= 0 and not y for v, y in zip(values, labels, strict=True))
    assert got["step_error_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    erroneous, clean, at = [], [], 0
    for s in solutions:
        v = values[at : at + len(s)]
        at += len(s)
        truth, guess = first_error_reference([not c for c in s]), first_error_reference([x < 0 for x in v])
        (erroneous if truth >= 0 else clean).append(truth == guess)
    acc_err, acc_ok = sum(erroneous) / len(erroneous), sum(clean) / len(clean)
    assert got["first_error_accuracy_erroneous"] == pytest.approx(acc_err)
    assert got["first_error_accuracy_correct"] == pytest.approx(acc_ok)
    assert got["first_error_f1"] == pytest.approx(2 * acc_err * acc_ok / (acc_err + acc_ok))
    assert got["num_solutions"] == 60 and got["num_steps"] == len(labels)


def test_auroc_needs_both_classes():
    assert math.isnan(auroc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))
    assert auroc(torch.tensor([0.1, 0.2, 0.2]), torch.tensor([False, True, False])) == pytest.approx(0.75)
