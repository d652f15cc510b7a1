"""Bin packing, the epoch plan (steps × ranks × micro-batches) and collate."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from bigrm.data.labels import Labels
from bigrm.data.packing import Update, collate, first_fit_decreasing, pack_bins, plan_epoch
from bigrm.data.sequences import Group

# ---------------------------------------------------------------- bins


def random_sizes(rng: random.Random, n: int, budget: int) -> list[int]:
    return [rng.choice([rng.randint(1, budget // 8), rng.randint(1, budget)]) for _ in range(n)]


def check_bins(bins: list[list[int]], items: list[int], sizes: list[int], budget: int) -> None:
    assert Counter(i for b in bins for i in b) == Counter(items)
    assert all(b for b in bins), "pack_bins never makes an empty bin"
    assert all(sum(sizes[i] for i in b) <= budget for b in bins)


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_decreasing(seed):
    rng = random.Random(seed)
    budget = 100
    sizes = random_sizes(rng, 80, budget)
    items = rng.sample(range(80), 60) + [3, 3, 7]  # repeats are packed as often as they appear
    bins = first_fit_decreasing(items, sizes, budget)
    check_bins(bins, items, sizes, budget)
    # first fit: no two bins are both at most half full (the later one's items would have fit in the earlier one)
    assert sum(1 for b in bins if 2 * sum(sizes[i] for i in b) <= budget) <= 1
    # decreasing: every bin's first item is no smaller than any item of a later bin's first item
    firsts = [sizes[b[0]] for b in bins]
    assert firsts == sorted(firsts, reverse=True)


@pytest.mark.parametrize("window", [1, 7, 50, 10_000])
@pytest.mark.parametrize("seed", range(3))
def test_pack_bins(window, seed):
    rng = random.Random(seed)
    budget = 64
    sizes = random_sizes(rng, 120, budget)
    order = list(range(120))
    rng.shuffle(order)
    bins = pack_bins(order, sizes, budget, window)
    check_bins(bins, order, sizes, budget)
    # FFD happens inside consecutive windows of `order`: a bin never mixes two windows, and bins follow the windows
    pos = {item: p for p, item in enumerate(order)}
    windows = [{pos[i] // window for i in b} for b in bins]
    assert all(len(w) == 1 for w in windows)
    seq = [w.pop() for w in windows]
    assert seq == sorted(seq)
    if window == 1:
        assert bins == [[i] for i in order]


def test_pack_bins_with_repeats_and_exact_fit():
    sizes = [5, 3, 2, 10]
    bins = pack_bins([0, 1, 2, 0, 3], sizes, budget=10, window=100)
    check_bins(bins, [0, 1, 2, 0, 3], sizes, 10)
    assert sorted(sorted(b) for b in bins) == [[0, 0], [1, 2], [3]]


def test_pack_bins_rejects_oversize_items():
    with pytest.raises(ValueError, match="exceed"):
        pack_bins([0, 1, 2], [5, 11, 3], budget=10, window=2)
    pack_bins([0, 1, 2], [5, 10, 3], budget=10, window=2)  # exactly the budget is fine


# ---------------------------------------------------------------- plan_epoch


def bin_tokens(b: list[int], sizes: list[int]) -> int:
    return sum(sizes[i] for i in b)


def check_plan(steps: list[Update], items: list[int], sizes: list[int], budget: int, world: int, accum: int) -> None:
    assert Counter(i for s in steps for r in s.micro_batches for mb in r for i in mb) == Counter(items)
    for n, step in enumerate(steps):
        final = n == len(steps) - 1
        assert len(step.micro_batches) == world
        assert all(len(r) == accum for r in step.micro_batches)
        mbs = [mb for r in step.micro_batches for mb in r]
        groups = sum(len(mb) for mb in mbs)
        assert step.num_groups == groups
        assert all(bin_tokens(mb, sizes) <= budget for mb in mbs)
        empty = sum(1 for mb in mbs if not mb)
        if not final:
            assert empty == 0
        elif groups >= world * accum:
            assert empty == 0, "the final step splits bins rather than leave a slot empty"
        else:
            assert empty == world * accum - groups
            assert all(len(mb) == 1 for mb in mbs if mb)
        loads = [sum(bin_tokens(mb, sizes) for mb in r) for r in step.micro_batches]
        assert max(loads) - min(loads) <= max(bin_tokens(mb, sizes) for mb in mbs)


def plan(items, sizes, world, accum, *, budget=100, window=64, seed=0, epoch=0):
    return plan_epoch(items, sizes, budget=budget, world=world, accum=accum, window=window, seed=seed, epoch=epoch)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("n", [1, 5, 40, 301])
@pytest.mark.parametrize("seed", range(3))
def test_plan_epoch_invariants(world, accum, n, seed):
    rng = random.Random(seed * 7 + n)
    budget = 100
    sizes = random_sizes(rng, n, budget)
    items = list(range(n)) + [rng.randrange(n) for _ in range(n // 4)]
    steps = plan(items, sizes, world, accum, budget=budget, window=rng.choice([8, 64, 1000]), seed=seed)
    assert steps
    check_plan(steps, items, sizes, budget, world, accum)


def test_plan_epoch_empty():
    assert plan([], [], 2, 3) == []


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (4, 3)])
def test_plan_epoch_deterministic(world, accum):
    rng = random.Random(0)
    sizes = random_sizes(rng, 200, 100)
    items = list(range(200))
    a = plan(items, sizes, world, accum, seed=3, epoch=1)
    assert a == plan(items, sizes, world, accum, seed=3, epoch=1)
    assert a != plan(items, sizes, world, accum, seed=3, epoch=2)
    assert a != plan(items, sizes, world, accum, seed=4, epoch=1)
    check_plan(plan(items, sizes, world, accum, seed=3, epoch=2), items, sizes, 100, world, accum)


@pytest.mark.parametrize("world,accum", [(1, 1), (1, 3), (2, 3), (4, 1)])
def test_final_step_splits_bins(world, accum):
    """Ten small groups fit one bin: the only step still fills all world*accum slots by splitting it."""
    sizes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    steps = plan(list(range(10)), sizes, world, accum, budget=1000, window=1000)
    assert len(steps) == 1
    mbs = [mb for r in steps[0].micro_batches for mb in r]
    assert sorted(i for mb in mbs for i in mb) == list(range(10))
    assert all(mbs)
    assert steps[0].num_groups == 10
    check_plan(steps, list(range(10)), sizes, 1000, world, accum)


def test_final_step_placeholders_only_when_too_few_groups():
    sizes = [3, 3, 3, 3]
    steps = plan([0, 1, 2, 3], sizes, 2, 3, budget=1000, window=1000)
    assert len(steps) == 1
    mbs = [mb for r in steps[0].micro_batches for mb in r]
    assert sorted(len(mb) for mb in mbs) == [0, 0, 1, 1, 1, 1]
    assert steps[0].num_groups == 4
    # balanced: each rank gets two of the four groups
    assert [sum(len(mb) for mb in r) for r in steps[0].micro_batches] == [2, 2]


def test_final_step_split_after_full_steps():
    """Many steps, then a last chunk with fewer bins than slots but enough groups to fill them."""
    rng = random.Random(5)
    sizes = [rng.randint(1, 10) for _ in range(400)]
    for seed in range(20):
        steps = plan(list(range(400)), sizes, 4, 3, budget=60, window=400, seed=seed)
        check_plan(steps, list(range(400)), sizes, 60, 4, 3)
        assert len(steps) > 1
        assert all(mb for r in steps[-1].micro_batches for mb in r)


def step_sets(steps: list[Update]) -> list[frozenset]:
    return [frozenset(Counter(i for r in s.micro_batches for mb in r for i in mb).items()) for s in steps]


@pytest.mark.parametrize("n", [3, 17, 250])
@pytest.mark.parametrize("seed", range(3))
def test_same_groups_per_step_whatever_the_split(n, seed):
    rng = random.Random(seed)
    sizes = random_sizes(rng, n, 100)
    items = list(range(n)) + list(range(0, n, 3))
    for shapes in ([(1, 2), (2, 1)], [(1, 4), (2, 2), (4, 1)], [(2, 3), (3, 2), (6, 1)]):
        plans = [plan(items, sizes, w, a, seed=seed, epoch=1) for w, a in shapes]
        ref = step_sets(plans[0])
        for p, (w, a) in zip(plans, shapes, strict=True):
            check_plan(p, items, sizes, 100, w, a)
            assert step_sets(p) == ref
            assert [s.num_groups for s in p] == [s.num_groups for s in plans[0]]


def test_plan_epoch_rejects_oversize():
    with pytest.raises(ValueError):
        plan([0, 1], [10, 200], 2, 1, budget=100)


# ---------------------------------------------------------------- collate


def make_groups(rng: np.random.Generator, n: int) -> list[Group]:
    groups = []
    for g in range(n):
        k = int(rng.integers(2, 6))
        seqs = tuple(rng.integers(1, 1000, size=int(rng.integers(1, 12))).astype(np.int64) for _ in range(k))
        groups.append(Group(seqs, f"src{g}", Labels(margin=float(rng.uniform(0, 2)))))
    return groups


@pytest.mark.parametrize("seed", range(4))
def test_collate(seed):
    rng = np.random.default_rng(seed)
    groups = make_groups(rng, 5)
    seqs = [s for g in groups for s in g.seqs]
    lens = [len(s) for s in seqs]
    real = sum(lens)
    b = collate(groups, pad_id=0)

    assert b.input_ids.shape == (1, real) and b.input_ids.dtype == torch.int64
    assert b.input_ids[0].tolist() == np.concatenate(seqs).tolist()
    assert b.position_ids.shape == (1, real)
    assert b.position_ids[0].tolist() == [p for n in lens for p in range(n)]
    assert b.cu_seqlens.dtype == torch.int32
    assert b.cu_seqlens.tolist() == [0, *np.cumsum(lens).tolist()]
    assert b.last_index.tolist() == (np.cumsum(lens) - 1).tolist()
    assert b.input_ids[0, b.last_index].tolist() == [int(s[-1]) for s in seqs]
    assert b.labels.seg_group.tolist() == [g for g, grp in enumerate(groups) for _ in grp.seqs]
    assert b.labels.seg_rank.tolist() == [k for grp in groups for k in range(len(grp.seqs))]
    torch.testing.assert_close(
        b.labels.group_margin, torch.tensor([g.labels.margin for g in groups], dtype=torch.float32)
    )
    assert b.max_seqlen == max(lens)
    assert b.labels.num_groups == 5
    assert b.real_tokens == real == sum(g.num_tokens for g in groups)
    assert b.processed_tokens == real


@pytest.mark.parametrize("seed", range(6))
def test_collate_pad_to_multiple(seed):
    rng = np.random.default_rng(100 + seed)
    groups = make_groups(rng, 3)
    seqs = [s for g in groups for s in g.seqs]
    lens = [len(s) for s in seqs]
    real = sum(lens)
    unpadded = collate(groups, pad_id=7)
    b = collate(groups, pad_id=7, pad_to_multiple=8)

    assert b.processed_tokens % 8 == 0
    assert real <= b.processed_tokens < real + 8
    assert b.real_tokens == real
    pad = b.processed_tokens - real
    assert b.input_ids[0, :real].tolist() == unpadded.input_ids[0].tolist()
    assert b.input_ids[0, real:].tolist() == [7] * pad
    assert torch.equal(b.last_index, unpadded.last_index)
    for name in ("seg_group", "seg_rank", "group_margin"):
        assert torch.equal(getattr(b.labels, name), getattr(unpadded.labels, name)), name
    if pad:  # the padding is its own segment, not scored
        assert b.cu_seqlens.tolist() == [*unpadded.cu_seqlens.tolist(), real + pad]
        assert b.position_ids[0].tolist() == unpadded.position_ids[0].tolist() + list(range(pad))
        assert len(b.last_index) == len(seqs) == len(b.cu_seqlens) - 2
        assert int(b.last_index.max()) < real
        assert b.max_seqlen == max(*lens, pad)
    else:
        assert b.cu_seqlens.tolist() == unpadded.cu_seqlens.tolist()
        assert b.position_ids.tolist() == unpadded.position_ids.tolist()


def test_collate_pad_segment_exists():
    g = Group((np.array([1, 2, 3], dtype=np.int64), np.array([4, 5], dtype=np.int64)), "x", Labels(margin=0.5))
    b = collate([g], pad_id=0, pad_to_multiple=8)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 8]
    assert b.last_index.tolist() == [2, 4]
    assert b.labels.seg_rank.tolist() == [0, 1]
    assert b.real_tokens == 5 and b.processed_tokens == 8 and b.max_seqlen == 3


@pytest.mark.parametrize("multiple,tokens", [(1, 1), (8, 8)])
def test_collate_empty_placeholder(multiple, tokens):
    b = collate([], pad_id=3, pad_to_multiple=multiple)
    assert b.labels.num_groups == 0
    assert b.real_tokens == 0
    assert b.input_ids.tolist() == [[3] * tokens]
    assert b.position_ids.tolist() == [list(range(tokens))]
    assert b.cu_seqlens.tolist() == [0, tokens]
    assert b.last_index.numel() == 0
    for name in ("seg_group", "seg_rank", "group_margin"):
        assert getattr(b.labels, name).numel() == 0, name
    assert b.processed_tokens == tokens


def test_collate_carries_ties_scores_targets_and_weights():
    one = np.array([5, 6], dtype=np.int64)
    groups = [
        Group((one, one + 1, one + 2), "a", Labels(ranks=(0, 0, 1), margin=0.5, weight=2.0)),
        Group((one, one + 3), "b", Labels(ranks=(1, 0), scores=(1.0, 4.0), targets=(-1.0, 1.0))),
    ]
    b = collate(groups, pad_id=0)
    assert b.labels.seg_rank.tolist() == [0, 0, 1, 1, 0]
    assert b.labels.seg_score[:3].isnan().all() and b.labels.seg_score[3:].tolist() == [1.0, 4.0]
    assert b.labels.seg_target[:3].isnan().all() and b.labels.seg_target[3:].tolist() == [-1.0, 1.0]
    assert b.labels.group_weight.tolist() == [2.0, 1.0] and b.labels.group_margin.tolist() == [0.5, 0.0]


@pytest.mark.parametrize("share_prompt", [False, True])
def test_collate_gives_each_completion_its_length_from_its_first_token(share_prompt):
    prompt = np.array([5, 6, 7])
    # the completions share their first token, which is theirs, not the prompt's
    g0 = Group((np.concatenate([prompt, [1, 2]]), np.concatenate([prompt, [1, 4, 8, 9]])), "g0", starts=(3, 3))
    # prompts cut from the left by different amounts: no common prefix, yet the completions are short
    g1 = Group((np.array([2, 1]), np.array([9, 3]), np.array([4, 4, 4])), "g1", starts=(1, 1, 2))
    batch = collate([g0, g1], pad_id=0, share_prompt=share_prompt)
    assert batch.labels.seg_length.tolist() == [2, 4, 1, 1, 1]
    assert collate([g0, Group(g1.seqs, "g1")], pad_id=0).labels.seg_length is None  # starts unknown
