"""The fused loss against slow, obviously-correct Python loops, for every label kind and loss option."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigrm.config import LossConfig
from bigrm.data.labels import Labels
from bigrm.data.packing import SegmentLabels
from bigrm.data.sequences import Group
from bigrm.objectives.ranking import denominators, group_units, metrics, pair_grid, ranking_loss, terms


def random_groups(seed: int, n: int = 30, scored_share: float = 0.3, tie_share: float = 0.3, k_max: int = 8):
    """Ranked rows (some with tie blocks), scored rows (some with equal scores), random margins and weights."""
    rng = random.Random(seed)
    groups = []
    for _ in range(n):
        k = rng.randint(2, k_max)
        if rng.random() < scored_share:
            scores = [float(rng.randint(0, 4)) for _ in range(k)]
            distinct = sorted(set(scores), reverse=True)
            ranks = [distinct.index(s) for s in scores]
            targets = [rng.gauss(0, 1) for _ in range(k)]
        else:
            scores = targets = None
            ranks = sorted(rng.randint(0, k - 1) for _ in range(k)) if rng.random() < tie_share else list(range(k))
        groups.append(
            {"ranks": ranks, "scores": scores, "targets": targets, "margin": rng.choice([0.0, 0.5]),
             "weight": rng.choice([1.0, 0.5, 2.0]), "rewards": [rng.gauss(0, 1) for _ in range(k)]}
        )  # fmt: skip
    return groups


def labels(groups, dtype=torch.float64) -> SegmentLabels:
    nan = float("nan")
    return SegmentLabels(
        seg_group=torch.tensor([i for i, g in enumerate(groups) for _ in g["ranks"]]),
        seg_rank=torch.tensor([r for g in groups for r in g["ranks"]]),
        seg_score=torch.tensor([v for g in groups for v in (g["scores"] or [nan] * len(g["ranks"]))], dtype=dtype),
        seg_target=torch.tensor([v for g in groups for v in (g["targets"] or [nan] * len(g["ranks"]))], dtype=dtype),
        group_margin=torch.tensor([g["margin"] for g in groups], dtype=dtype),
        group_weight=torch.tensor([g["weight"] for g in groups], dtype=dtype),
        num_groups=len(groups),
    )


def reference_terms(g, r, cfg: LossConfig):
    """(ranking sum, units, extras) of one prompt; r is a list of 0-d tensors."""
    k, rank = len(r), g["ranks"]
    zero = r[0] * 0
    ranking, units = zero, 0
    if not (g["targets"] is not None and cfg.scores == "regress"):
        if cfg.objective == "pairwise":
            for i, j in itertools.permutations(range(k), 2):
                if rank[i] < rank[j]:
                    m = g["margin"] + (cfg.score_margin_scale * (g["scores"][i] - g["scores"][j]) if g["scores"] else 0)
                    ranking = ranking - F.logsigmoid(r[i] - r[j] - m)
                    units += 1
        else:
            for i in range(k):
                risk = [j for j in range(k) if rank[j] >= rank[i]]
                if len(risk) > 1:
                    ranking = ranking - r[i] + torch.logsumexp(torch.stack([r[j] for j in risk]), 0)
                    units += 1
    extras = zero
    if g["targets"] is not None and cfg.scores != "rank":
        extras = extras + cfg.regress_weight * sum((r[i] - g["targets"][i]) ** 2 for i in range(k)) / k
    ties = [(i, j) for i, j in itertools.combinations(range(k), 2) if rank[i] == rank[j]]
    if cfg.tie_coef and ties:
        extras = extras + cfg.tie_coef * sum((r[i] - r[j]) ** 2 for i, j in ties) / len(ties)
    every = list(itertools.combinations(range(k), 2))
    extras = extras + cfg.center_rewards_coef * sum((r[i] + r[j]) ** 2 for i, j in every) / len(every)
    extras = extras + cfg.l2_rewards_coef * sum(x**2 for x in r) / k
    return ranking, units, extras


def reference_loss(groups, rewards, cfg: LossConfig):
    flat = list(rewards)
    at, parts = 0, []
    for g in groups:
        parts.append(reference_terms(g, flat[at : at + len(g["ranks"])], cfg))
        at += len(g["ranks"])
    w = [g["weight"] for g in groups]
    extras = sum(wi * e for wi, (_, _, e) in zip(w, parts, strict=True)) / sum(w)
    if cfg.pair_weighting == "per_prompt":
        ranking = sum(wi * s / max(u, 1) for wi, (s, u, _) in zip(w, parts, strict=True)) / sum(w)
    else:
        ranking = sum(wi * s for wi, (s, _, _) in zip(w, parts, strict=True)) / sum(
            wi * u for wi, (_, u, _) in zip(w, parts, strict=True)
        )
    return ranking + extras


CONFIGS = [
    LossConfig(),
    LossConfig(pair_weighting="per_pair"),
    LossConfig(objective="listmle"),
    LossConfig(objective="listmle", pair_weighting="per_pair"),
    LossConfig(scores="regress", regress_weight=0.7),
    LossConfig(scores="both", score_margin_scale=0.3),
    LossConfig(tie_coef=0.5, center_rewards_coef=0.1, l2_rewards_coef=0.05),
    LossConfig(objective="listmle", scores="both", tie_coef=0.2, l2_rewards_coef=0.1, pair_weighting="per_pair"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.objective}-{c.pair_weighting}-{c.scores}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_match_the_python_loops(cfg, seed):
    groups = random_groups(seed)
    rewards = torch.tensor([x for g in groups for x in g["rewards"]], dtype=torch.float64, requires_grad=True)
    got, _ = ranking_loss(rewards, labels(groups), cfg)
    (grad,) = torch.autograd.grad(got, rewards)
    ref_rewards = rewards.detach().clone().requires_grad_(True)
    want = reference_loss(groups, ref_rewards.unbind(), cfg)
    (ref_grad,) = torch.autograd.grad(want, ref_rewards)
    assert got.item() == pytest.approx(want.item(), abs=1e-10)
    torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=1e-8)


def test_k2_equals_trl_reward_trainer_with_centering():
    rng = torch.Generator().manual_seed(0)
    chosen, rejected, margin = torch.randn(64, generator=rng), torch.randn(64, generator=rng), torch.rand(64)
    groups = [{"ranks": [0, 1], "scores": None, "targets": None, "margin": float(m), "weight": 1.0} for m in margin]
    rewards = torch.stack([chosen, rejected], 1).reshape(-1).double()
    got, _ = ranking_loss(rewards, labels(groups), LossConfig(center_rewards_coef=0.01))
    # TRL: -logsigmoid(r_c - r_r - margin).mean() + center_rewards_coefficient * mean((r_c + r_r)^2)
    trl = -F.logsigmoid(chosen - rejected - margin).mean() + 0.01 * ((chosen + rejected) ** 2).mean()
    assert got.item() == pytest.approx(trl.item(), abs=1e-6)


def test_listmle_without_ties_is_the_plackett_luce_likelihood():
    r = torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=torch.float64)
    groups = [{"ranks": [0, 1, 2, 3], "scores": None, "targets": None, "margin": 0.0, "weight": 1.0}]
    got, _ = ranking_loss(r, labels(groups), LossConfig(objective="listmle", pair_weighting="per_pair"))
    log_likelihood = sum(r[i] - torch.logsumexp(r[i:], 0) for i in range(4))
    assert got.item() == pytest.approx(-log_likelihood.item() / 3, abs=1e-12)  # 3 completions have someone to beat


def test_tied_completions_are_not_pushed_apart_unless_asked():
    r = torch.tensor([0.5, -0.5, 1.0], dtype=torch.float64, requires_grad=True)
    groups = [{"ranks": [0, 0, 1], "scores": None, "targets": None, "margin": 0.0, "weight": 1.0}]
    loss, _ = ranking_loss(r, labels(groups), LossConfig())
    (grad,) = torch.autograd.grad(loss, r)
    assert loss.item() == pytest.approx(
        (F.softplus(-(r[0] - r[2])) + F.softplus(-(r[1] - r[2]))).item() / 2, abs=1e-12
    )  # the tied pair (0, 1) adds nothing
    pulled, _ = ranking_loss(r, labels(groups), LossConfig(tie_coef=1.0))
    assert pulled.item() == pytest.approx(loss.item() + 1.0, abs=1e-12)  # + (0.5 - (-0.5))^2
    assert grad[0] != grad[1]


def test_scored_rows_rank_by_score_and_regress_to_targets():
    r = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    g = {"ranks": [1, 0, 1], "scores": [3.0, 5.0, 3.0], "targets": [-0.5, 1.0, -0.5], "margin": 0.0, "weight": 1.0}
    rank_loss, _ = ranking_loss(r, labels([g]), LossConfig(scores="rank", score_margin_scale=0.5))
    want = (F.softplus(-(r[1] - r[0] - 1.0)) + F.softplus(-(r[1] - r[2] - 1.0))) / 2  # margin 0.5 * (5 - 3)
    assert rank_loss.item() == pytest.approx(want.item(), abs=1e-12)
    regress, _ = ranking_loss(r, labels([g]), LossConfig(scores="regress", regress_weight=2.0))
    assert regress.item() == pytest.approx(2.0 * ((1.5**2 + 1.0**2 + 0.5**2) / 3), abs=1e-12)
    both, _ = ranking_loss(r, labels([g]), LossConfig(scores="both", score_margin_scale=0.5, regress_weight=2.0))
    assert both.item() == pytest.approx(rank_loss.item() + regress.item(), abs=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.objective}-{c.pair_weighting}-{c.scores}")
def test_step_denominators_make_micro_batches_add_up(cfg):
    """Prompts split over micro-batches (and ranks) with the step's denominators sum to the one-batch loss."""
    groups = random_groups(5, n=24)
    as_groups = [
        Group(tuple(np.zeros(1, np.int64) for _ in g["ranks"]), "", Labels(tuple(g["ranks"]),
              g["scores"] and tuple(g["scores"]), g["targets"] and tuple(g["targets"]), g["margin"], g["weight"]))
        for g in groups
    ]  # fmt: skip
    sums = denominators(as_groups, cfg)
    whole, _ = ranking_loss(torch.tensor([x for g in groups for x in g["rewards"]], dtype=torch.float64),
                            labels(groups), cfg)  # fmt: skip
    parts = 0.0
    for lo, hi in ((0, 7), (7, 8), (8, 24)):
        chunk = groups[lo:hi]
        r = torch.tensor([x for g in chunk for x in g["rewards"]], dtype=torch.float64)
        parts += ranking_loss(r, labels(chunk), cfg, *sums)[0].item()
        grid = pair_grid(r, labels(chunk).seg_group, labels(chunk).seg_rank, len(chunk),
                         labels(chunk).seg_score, labels(chunk).seg_target)  # fmt: skip
        units = terms(grid, labels(chunk).group_margin, cfg).units.tolist()
        assert units == [group_units(g, cfg) for g in as_groups[lo:hi]]
    assert parts == pytest.approx(whole.item(), abs=1e-10)


def test_metrics_match_the_python_loops():
    cfg = LossConfig(tie_threshold=0.3)
    groups = random_groups(7, n=40, tie_share=0.6)
    for g in groups:  # rounded rewards make reward ties
        g["rewards"] = [round(x, 1) for x in g["rewards"]]
    rewards = torch.tensor([x for g in groups for x in g["rewards"]], dtype=torch.float64)
    got = metrics(ranking_loss(rewards, labels(groups), cfg)[1], cfg)
    pairs = correct = ties = close = 0
    taus = []
    for g in groups:
        r, rank = g["rewards"], g["ranks"]
        strict = [(i, j) for i, j in itertools.permutations(range(len(r)), 2) if rank[i] < rank[j]]
        pairs += len(strict)
        correct += sum(r[i] > r[j] for i, j in strict)
        if strict:
            taus.append(sum((r[i] > r[j]) - (r[i] < r[j]) for i, j in strict) / len(strict))
        tied = [(i, j) for i, j in itertools.combinations(range(len(r)), 2) if rank[i] == rank[j]]
        ties += len(tied)
        close += sum(abs(r[i] - r[j]) < 0.3 for i, j in tied)
    flat = [x for g in groups for x in g["rewards"]]
    mean = sum(flat) / len(flat)
    assert got["pairwise_accuracy"] == pytest.approx(correct / pairs, abs=1e-12)
    assert got["kendall_tau"] == pytest.approx(sum(taus) / len(taus), abs=1e-12)
    assert got["tie_accuracy"] == pytest.approx(close / ties, abs=1e-12) and got["num_tie_pairs"] == ties
    assert got["num_pairs"] == pairs and got["num_prompts"] == len(groups)
    assert got["reward_mean"] == pytest.approx(mean, abs=1e-12)
    assert got["reward_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat)), abs=1e-9)
    assert got["loss"] == pytest.approx(reference_loss(groups, rewards.unbind(), cfg).item(), abs=1e-10)
    no_ties = [dict(g, ranks=list(range(len(g["ranks"])))) for g in groups if g["scores"] is None]
    assert "tie_accuracy" not in metrics(ranking_loss(rewards[:0], labels([]), cfg)[1], cfg)
    assert "tie_accuracy" not in metrics(
        ranking_loss(torch.tensor([x for g in no_ties for x in g["rewards"]]), labels(no_ties), cfg)[1], cfg
    )


def test_placeholder_micro_batch_keeps_the_graph():
    r = torch.zeros(1, requires_grad=True)
    loss, stats = ranking_loss(r, labels([]), LossConfig())
    assert loss.item() == 0 and loss.grad_fn is not None and not stats.stack().any()
    loss.backward()
    assert r.grad.item() == 0


def test_large_k_vectorised_matches_the_reference_on_a_subset():
    cfg = LossConfig(objective="listmle", tie_coef=0.1)
    groups = random_groups(11, n=300, k_max=64, scored_share=0.2)
    rewards = torch.tensor([x for g in groups for x in g["rewards"]], dtype=torch.float64)
    lab = labels(groups)
    t = terms(pair_grid(rewards, lab.seg_group, lab.seg_rank, len(groups), lab.seg_score, lab.seg_target),
              lab.group_margin, cfg)  # fmt: skip
    at = 0
    starts = []
    for g in groups:
        starts.append(at)
        at += len(g["ranks"])
    for i in range(0, 300, 37):
        g = groups[i]
        s, u, e = reference_terms(g, list(rewards[starts[i] : starts[i] + len(g["ranks"])].unbind()), cfg)
        assert t.ranking[i].item() == pytest.approx(float(s), abs=1e-9)
        assert t.units[i].item() == u and t.extras[i].item() == pytest.approx(float(e), abs=1e-9)
