"""evaluate_rewards() with a fake reward model, and the rank sharding of held-out groups."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from bigrm import dist
from bigrm.config import LossConfig
from bigrm.data.labels import Labels
from bigrm.data.packing import PackedBatch
from bigrm.data.sequences import Group
from bigrm.objectives.ranking import Stats, metrics
from bigrm.training.evaluate import evaluate_rewards, shard

CPU = torch.device("cpu")
PAD = 0


def evaluate(*args, **kwargs) -> dict[str, float]:
    return evaluate_rewards(*args, **kwargs)[0]


def make_groups(seed: int, n: int, max_k: int = 6) -> list[Group]:
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n):
        k = int(rng.integers(2, max_k + 1))
        # small token ids so segment sums tie now and then
        seqs = tuple(rng.integers(1, 4, size=int(rng.integers(1, 6))).astype(np.int64) for _ in range(k))
        groups.append(Group(seqs, f"g{g}", Labels(margin=float(rng.choice([0.0, 0.5, 1.0])))))
    return groups


class SumModel:
    """reward of a scored segment = sum of its token ids / 4, read from the packed batch alone."""

    def __init__(self):
        self.calls: list[PackedBatch] = []

    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        self.calls.append(batch)
        ids = batch.input_ids[0]
        cu = batch.cu_seqlens.long()
        n = len(batch.last_index)
        assert n == len(batch.labels.seg_group) == len(batch.labels.seg_rank)
        out = []
        for s in range(n):
            assert int(batch.last_index[s]) == int(cu[s + 1]) - 1
            out.append(float(ids[cu[s] : cu[s + 1]].sum()) / 4.0)
        return torch.tensor(out, dtype=torch.float32)


def direct_metrics(groups: list[Group], coef: float = 0.0) -> dict[str, float]:
    pairs = correct = 0
    tau_sum = loss_sum = 0.0
    for g in groups:
        r = [float(s.sum()) / 4.0 for s in g.seqs]  # best first
        k = len(r)
        conc = disc = 0
        pair_loss = 0.0
        for i in range(k):
            for j in range(i + 1, k):
                conc += r[i] > r[j]
                disc += r[i] < r[j]
                pair_loss += -math.log(1.0 / (1.0 + math.exp(-(r[i] - r[j] - g.labels.margin))))
        n = math.comb(k, 2)
        pairs += n
        correct += conc
        tau_sum += (conc - disc) / n
        loss_sum += pair_loss / n + coef * sum(x * x for x in r) / k
    flat = [float(s.sum()) / 4.0 for g in groups for s in g.seqs]
    mean = sum(flat) / len(flat)
    return {
        "reward_mean": mean,
        "reward_std": math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat)),
        "pairwise_accuracy": correct / pairs,
        "loss": loss_sum / len(groups),
        "kendall_tau": tau_sum / len(groups),
        "num_prompts": len(groups),
        "num_pairs": pairs,
    }


def assert_metrics_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    assert got["num_prompts"] == want["num_prompts"]
    assert got["num_pairs"] == want["num_pairs"]
    assert got["pairwise_accuracy"] == pytest.approx(want["pairwise_accuracy"], abs=1e-12)
    assert got["kendall_tau"] == pytest.approx(want["kendall_tau"], abs=1e-6)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["reward_mean"] == pytest.approx(want["reward_mean"], rel=1e-6, abs=1e-9)
    assert got["reward_std"] == pytest.approx(want["reward_std"], rel=1e-5, abs=1e-9)


def test_world_is_one_without_process_group():
    assert not torch.distributed.is_initialized()
    assert dist.world() == 1 and dist.rank() == 0
    t = torch.arange(3.0)
    assert torch.equal(dist.all_sum(t), t)


@pytest.mark.parametrize("coef", [0.0, 0.1])
@pytest.mark.parametrize("budget,window", [(40, 4), (60, 1000), (10_000, 1000)])
@pytest.mark.parametrize("seed", range(3))
def test_evaluate_matches_direct_computation(coef, budget, window, seed):
    groups = make_groups(seed, 45)
    assert max(g.num_tokens for g in groups) <= 40
    model = SumModel()
    got = evaluate(
        model, groups, budget=budget, window=window, pad_id=PAD, device=CPU, cfg=LossConfig(l2_rewards_coef=coef)
    )
    assert_metrics_close(got, direct_metrics(groups, coef))
    # every group went through the model exactly once, within the budget
    assert sum(b.labels.num_groups for b in model.calls) == len(groups)
    assert all(b.real_tokens <= budget for b in model.calls)
    if budget == 40:
        assert len(model.calls) > 1


def test_evaluate_metrics_are_not_trivial():
    """The fixture has both right and wrong orderings and reward ties, so the comparison above can fail."""
    groups = make_groups(0, 45)
    want = direct_metrics(groups)
    assert 0.2 < want["pairwise_accuracy"] < 0.8
    assert -0.9 < want["kendall_tau"] < 0.9
    ties = sum(float(a.sum()) == float(b.sum()) for g in groups for i, a in enumerate(g.seqs) for b in g.seqs[i + 1 :])
    assert ties > 0
    reversed_groups = [Group(g.seqs[::-1], g.source, g.labels) for g in groups]
    got = evaluate(SumModel(), reversed_groups, budget=60, window=8, pad_id=PAD, device=CPU, cfg=LossConfig())
    assert got["kendall_tau"] == pytest.approx(-want["kendall_tau"], abs=1e-6)


def test_evaluate_no_groups():
    model = SumModel()
    got = evaluate(model, [], budget=50, window=8, pad_id=PAD, device=CPU, cfg=LossConfig())
    assert got == metrics(Stats.zeros(), LossConfig())
    assert got["num_prompts"] == 0


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n,budget", [(1, 1000), (7, 40), (45, 40), (45, 10_000)])
def test_shard_covers_all_groups_evenly(world, n, budget):
    groups = make_groups(n, n)
    shards = [shard(groups, budget, 8, world, r) for r in range(world)]
    assert len({len(s) for s in shards}) == 1, "every rank runs the same number of micro-batches"
    assert Counter(i for s in shards for mb in s for i in mb) == Counter(range(n))
    assert all(sum(groups[i].num_tokens for i in mb) <= budget for s in shards for mb in s)
    # placeholders only to even out the count: fewer than `world` of them
    assert sum(1 for s in shards for mb in s if not mb) < world
    # world 1 sees everything in the same bins
    flat = sorted(sorted(mb) for s in shards for mb in s if mb)
    assert flat == sorted(sorted(mb) for mb in shard(groups, budget, 8, 1, 0))


def test_shard_two_ranks():
    groups = make_groups(11, 45)
    r0 = shard(groups, 40, 8, 2, 0)
    r1 = shard(groups, 40, 8, 2, 1)
    assert len(r0) == len(r1) > 1
    assert sorted(i for mb in r0 + r1 for i in mb) == list(range(45))
    assert not set(i for mb in r0 for i in mb) & set(i for mb in r1 for i in mb)


@pytest.mark.parametrize("world", [2, 3])
def test_evaluate_sharded_over_fake_ranks(monkeypatch, world):
    """Each fake rank evaluates its shard; the summed stats give the single-rank metrics."""
    groups = make_groups(3, 31)
    totals = []
    calls = []
    monkeypatch.setattr(dist, "world", lambda: world)
    monkeypatch.setattr(dist, "all_sum", lambda t: totals.append(t.clone()) or t)
    for r in range(world):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        model = SumModel()
        evaluate(model, groups, budget=30, window=8, pad_id=PAD, device=CPU, cfg=LossConfig(l2_rewards_coef=0.1))
        calls.append(model.calls)
    assert len({len(c) for c in calls}) == 1
    assert sum(b.labels.num_groups for c in calls for b in c) == len(groups)
    n = len(Stats.zeros(CPU).stack())
    totals, rewards = [t[:n] for t in totals], sum(t[n:] for t in totals)  # each all_sum: stats, then rewards
    assert_metrics_close(metrics(Stats.unstack(sum(totals)), LossConfig()), direct_metrics(groups, 0.1))
    for t in totals:  # no rank saw every group
        assert 0 < metrics(Stats.unstack(t), LossConfig())["num_prompts"] < len(groups)
    # every completion's reward, in group order, from the one rank that evaluated it (evaluate_rewards)
    assert rewards.tolist() == [float(s.sum()) / 4.0 for g in groups for s in g.seqs]


def test_evaluate_uses_collate_layout():
    """The fake model sees exactly the scored sequences of the groups, best first, no padding segment."""
    groups = make_groups(5, 9)
    model = SumModel()
    evaluate(model, groups, budget=10_000, window=1000, pad_id=PAD, device=CPU, cfg=LossConfig())
    seen = []
    for b in model.calls:
        cu = b.cu_seqlens.long().tolist()
        assert len(cu) == len(b.last_index) + 1
        segs = [tuple(b.input_ids[0, cu[s] : cu[s + 1]].tolist()) for s in range(len(cu) - 1)]
        by_group: dict[int, list] = {}
        for s, (g, k) in enumerate(zip(b.labels.seg_group.tolist(), b.labels.seg_rank.tolist(), strict=True)):
            by_group.setdefault(g, []).append((k, segs[s]))
        seen += [tuple(seq for _, seq in sorted(v)) for v in by_group.values()]
    want = [tuple(tuple(s.tolist()) for s in g.seqs) for g in groups]
    assert sorted(seen) == sorted(want)


def test_evaluate_with_random_groups_larger_k():
    rng = random.Random(9)
    groups = []
    for g in range(20):
        k = rng.choice([2, 3, 8, 16])
        seqs = tuple(np.array([rng.randint(1, 9) for _ in range(rng.randint(1, 4))], dtype=np.int64) for _ in range(k))
        groups.append(Group(seqs, f"r{g}", Labels(margin=rng.random())))
    got = evaluate(SumModel(), groups, budget=70, window=5, pad_id=PAD, device=CPU, cfg=LossConfig())
    assert_metrics_close(got, direct_metrics(groups))
