"""The step plan of a run and its fingerprint: what every rank trains on, and what a resume must find unchanged."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from bigrm import dist
from bigrm.config import TrainConfig
from bigrm.data.pipeline import Dataset
from bigrm.data.sequences import Group
from bigrm.errors import CheckpointError
from bigrm.training.plan import check_resumable, plan, plan_fingerprint


def dataset(sizes: list[list[int]], weights: list[float] | None = None) -> Dataset:
    """Per file, groups of K=2 sequences with the given token counts."""
    train, files = [], []
    for f, file_sizes in enumerate(sizes):
        files.append(list(range(len(train), len(train) + len(file_sizes))))
        train += [Group((np.zeros(n // 2, np.int64), np.ones(n - n // 2, np.int64)), f"f{f}") for n in file_sizes]
    return Dataset(train, files, weights or [1.0] * len(sizes), eval=[])


def config(**train) -> TrainConfig:
    return replace(TrainConfig(), **{"max_tokens_per_batch": 40, "packing_window": 8, **train})


def groups_per_epoch(steps, epoch: int) -> Counter:
    return Counter(i for s in steps if s.epoch == epoch for rank in s.micro_batches for mb in rank for i in mb)


@pytest.mark.parametrize(("world", "accum"), [(1, 1), (2, 1), (2, 3)])
def test_every_prompt_once_per_epoch_and_every_rank_the_same_count(monkeypatch, world, accum):
    monkeypatch.setattr(dist, "world", lambda: world)
    rng = np.random.default_rng(world * 10 + accum)
    data = dataset([rng.integers(4, 30, 37).tolist(), rng.integers(4, 30, 11).tolist()])
    steps = plan(config(epochs=2, micro_batches_per_step=accum), data)
    for epoch in (0, 1):
        assert groups_per_epoch(steps, epoch) == Counter(range(48))
    assert all(len(s.micro_batches) == world and {len(r) for r in s.micro_batches} == {accum} for s in steps)
    assert all(sum(data.train[i].num_tokens for i in mb) <= 40 for s in steps for r in s.micro_batches for mb in r)
    assert [s.index for s in steps if s.epoch == 1] == list(range(sum(s.epoch == 1 for s in steps)))
    assert plan(config(epochs=2, micro_batches_per_step=accum), data) == steps  # every rank computes the same


def test_file_weights_and_max_steps():
    data = dataset([[10] * 8, [12] * 6], weights=[2.0, 0.5])
    steps = plan(config(), data)
    counts = groups_per_epoch(steps, 0)
    assert all(counts[i] == 2 for i in range(8)) and sum(counts[i] for i in range(8, 14)) == 3
    assert plan(config(max_steps=2), data) == steps[:2]


def test_the_fingerprint_changes_with_what_fixes_the_data_order_only():
    data = dataset([[10, 12, 14, 16]])
    base = plan_fingerprint(config(), data, plan(config(), data))
    for changed in ({"seed": 1}, {"epochs": 2}, {"max_tokens_per_batch": 41}, {"micro_batches_per_step": 2},
                    {"packing_window": 9}, {"share_prompt": True}):  # fmt: skip
        cfg = config(**changed)
        assert plan_fingerprint(cfg, data, plan(cfg, data)) != base, changed
    for unchanged in ({"lr": 1.0}, {"log_every": 3}, {"save_every": 5}, {"export": False}):
        cfg = config(**unchanged)
        assert plan_fingerprint(cfg, data, plan(cfg, data)) == base, unchanged
    other = dataset([[10, 12, 14, 17]])  # one token more in one prompt: other data
    assert plan_fingerprint(config(), other, plan(config(), other)) != base
    assert plan_fingerprint(config(max_steps=1), data, plan(config(max_steps=1), data)) != base


def test_a_resume_is_refused_when_the_plan_changed(tmp_path):
    data = dataset([[10, 12, 14, 16]])
    saved = plan_fingerprint(config(), data, plan(config(), data))
    check_resumable(saved, dict(saved), tmp_path)
    now = plan_fingerprint(config(seed=7), data, plan(config(seed=7), data))
    with pytest.raises(CheckpointError, match=r"cannot resume .*: the data plan changed \{'seed': \(42, 7\)"):
        check_resumable(saved, now, tmp_path)
