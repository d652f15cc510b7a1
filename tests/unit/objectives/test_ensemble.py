"""The ensemble's loss against a slow float64 reference (plain Python sums), its bootstrap weights included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bigrm.config import LossConfig
from bigrm.data.labels import Labels
from bigrm.data.packing import collate, prompt_id
from bigrm.data.sequences import Group
from bigrm.kinds import Ensemble
from bigrm.objectives.ensemble import PRIME, ROUNDS, bootstrap_weights


def slow_weight(source: str, member: int) -> int:
    """The Poisson(1) draw of bigrm.objectives.ensemble, in Python integers and math."""
    x = (prompt_id(source) + member * 1_000_003) % PRIME
    for multiplier, increment in ROUNDS:
        x = (x * multiplier + increment) % PRIME
        x ^= x >> 13
    u, k, cdf = x / PRIME, 0, math.exp(-1.0)
    while u >= cdf and k < 12:
        k += 1
        cdf += math.exp(-1.0) / math.factorial(k)
    return k


def slow_member_loss(rewards: list[list[float]], ranks: list[list[int]], weights: list[float], per_pair: bool,
                     weight_sum: float, unit_sum: float) -> float:  # fmt: skip
    """Σ_g w_g Σ_{i above j} -log σ(r_i - r_j) (/ units_g per prompt), over the given denominators."""
    total = 0.0
    for r, rank, w in zip(rewards, ranks, weights, strict=True):
        pairs = [(i, j) for i in range(len(r)) for j in range(len(r)) if rank[i] < rank[j]]
        ranking = sum(math.log1p(math.exp(-(r[i] - r[j]))) for i, j in pairs)
        total += w * (ranking if per_pair else ranking / len(pairs))
    return total / (unit_sum if per_pair else weight_sum)


def groups(seed: int, n: int = 4, prefix: str = "train.jsonl:line ") -> list[Group]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n):
        k = int(rng.integers(2, 5))
        seqs = tuple(rng.integers(1, 50, int(rng.integers(2, 6))) for _ in range(k))
        ranks = [int(x) for x in rng.permutation(k)]
        weight = float(rng.choice([0.5, 1.25, 2.0]))  # exact in the labels' float32
        out.append(Group(seqs, f"{prefix}{seed * 100 + g}", Labels(ranks=ranks, weight=weight)))
    return out


def test_bootstrap_weights_are_the_slow_draws_poisson_and_independent_across_members():
    sources = [f"data.jsonl:line {i}" for i in range(20000)]
    ids = torch.tensor([prompt_id(s) for s in sources])
    w = bootstrap_weights(ids, 3)
    assert w.dtype == torch.float64 and w.shape == (3, 20000)
    assert [w[m, i].item() for m in range(3) for i in range(50)] == [
        slow_weight(s, m) for m in range(3) for s in sources[:50]
    ]
    for m in range(3):
        assert w[m].mean().item() == pytest.approx(1.0, abs=0.03) and w[m].var().item() == pytest.approx(1.0, abs=0.05)
        assert (w[m] == 0).double().mean().item() == pytest.approx(math.exp(-1), abs=0.02)
    assert abs(np.corrcoef(w[0].numpy(), w[1].numpy())[0, 1]) < 0.03
    assert torch.equal(bootstrap_weights(ids[:7], 2), w[:2, :7])  # a prompt's weights do not depend on its batch


@pytest.mark.parametrize("weighting", ["per_prompt", "per_pair"])
@pytest.mark.parametrize("bootstrap", [True, False])
def test_the_loss_is_the_sum_of_member_losses_on_their_bootstrap_weights(weighting, bootstrap):
    cfg, members = LossConfig(pair_weighting=weighting), 3
    kind, batch_groups, rest = Ensemble(members, bootstrap), groups(0), groups(1, 2)
    labels = collate(batch_groups, 0).labels
    n = len(labels.seg_group)
    values = torch.randn(n, members, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    norm = sum(kind.share(g, cfg) for g in batch_groups + rest)  # the update holds two more prompts elsewhere
    loss, stats, sums = kind.loss(values, labels, cfg, norm)
    want, per_pair = 0.0, weighting == "per_pair"
    for m in range(members):
        boot = [slow_weight(g.source, m) if bootstrap else 1 for g in batch_groups + rest]
        weights = [g.labels.weight * b for g, b in zip(batch_groups + rest, boot, strict=True)]
        units = [sum(a < b for a in g.labels.ranks for b in g.labels.ranks) for g in batch_groups + rest]
        rewards, at = [], 0
        for g in batch_groups:
            rewards.append(values[at : at + len(g.seqs), m].tolist())
            at += len(g.seqs)
        ranks = [g.labels.ranks for g in batch_groups]
        unit_sum = sum(w * u for w, u in zip(weights, units, strict=True))
        member = slow_member_loss(rewards, ranks, weights[: len(batch_groups)], per_pair, sum(weights), unit_sum)
        assert sums[m].item() == pytest.approx(member, abs=1e-10, rel=0)
        want += member
    assert loss.item() == pytest.approx(want, abs=1e-10, rel=0)
    assert sums[-1].item() == pytest.approx(len(batch_groups) / len(batch_groups + rest))
    assert stats.pairs.item() == sum(len(g.seqs) * (len(g.seqs) - 1) / 2 for g in batch_groups)
    metrics = kind.train_metrics(sums)
    assert metrics["members_loss"] == pytest.approx(want / sums[-1].item(), abs=1e-10)


def test_gradients_reach_each_member_from_its_own_loss_alone():
    cfg, kind = LossConfig(), Ensemble(2, bootstrap=False)
    labels = collate(groups(2), 0).labels
    values = torch.randn(len(labels.seg_group), 2, dtype=torch.float64, requires_grad=True)
    kind.loss(values, labels, cfg, None)[0].backward()
    alone = values.detach().clone().requires_grad_(True)
    Ensemble(2, bootstrap=False).loss(torch.stack([alone[:, 0], alone[:, 0].detach()], 1), labels, cfg, None)[
        0
    ].backward()
    torch.testing.assert_close(values.grad[:, 0], alone.grad[:, 0], atol=1e-12, rtol=0)
