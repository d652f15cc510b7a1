"""The step plan of a run and its fingerprint: what every rank trains on, and what a resume must find unchanged."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from bigrm import dist
from bigrm.config import Config, LossConfig, TrainConfig
from bigrm.data.labels import Labels
from bigrm.data.pipeline import Dataset
from bigrm.data.sequences import Group
from bigrm.errors import CheckpointError, ConfigError
from bigrm.training import plan as planning
from bigrm.training.plan import check_resumable, plan, plan_fingerprint, resumed_line


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


def test_a_sequence_parallel_group_trains_one_micro_batch(monkeypatch):
    """4 ranks as 2 groups of 2: the plan has 2 data-parallel slots, as 2 ranks without sequence parallelism."""
    data = dataset([[10, 12, 14, 16, 18, 20, 22]])
    monkeypatch.setattr(dist, "world", lambda: 2)
    two = plan(config(), data)
    monkeypatch.setattr(dist, "world", lambda: 4)
    monkeypatch.setattr(dist, "_SEQUENCE_PARALLEL", 2)
    assert dist.data_parallel_world() == 2 and plan(config(sequence_parallel=2), data) == two
    monkeypatch.setattr(dist, "rank", lambda: 3)
    assert dist.data_parallel_rank() == 1 and not dist.counts()
    assert "sequence_parallel" not in plan_fingerprint(config(), data, two)  # older checkpoints still compare


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
                    {"packing_window": 9}, {"share_prompt": True}, {"sequence_parallel": 2}):  # fmt: skip
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
    with pytest.raises(CheckpointError, match=r"cannot resume .*: the data plan changed \(train.seed 42 → 7\)"):
        check_resumable(saved, now, tmp_path)
    more = plan_fingerprint(config(epochs=2), data, plan(config(epochs=2), data))
    with pytest.raises(CheckpointError, match=r"train.epochs 1 → 2; optimizer steps 2 → 4\); a resume continues"):
        check_resumable(saved, more, tmp_path)


def full(**sections) -> Config:
    """A Config with some sections' options changed: {"train": {"lr": 1e-2}, ...}."""
    cfg = Config()
    for name, changes in sections.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **changes)})
    return cfg


@pytest.mark.parametrize(
    "changed",
    [
        {"train": {"lr": 1e-2}},
        {"train": {"adam_betas": [0.9, 0.99]}},
        {"train": {"weight_decay": 0.1}},
        {"train": {"warmup_ratio": 0.2}},
        {"train": {"min_lr_ratio": 0.5}},
        {"train": {"grad_clip": 0.5}},
        {"loss": {"objective": "listmle"}},
        {"loss": {"tie_coef": 0.5}},
        {"model": {"path": "other/model"}},
        {"model": {"dtype": "fp32"}},
        {"model": {"attn_impl": "eager"}},
        {"lora": {"r": 8}},
        {"quantization": {"type": "fp4"}},
    ],
)
def test_a_resume_that_changes_the_optimisation_is_refused_unless_overridden(tmp_path, changed):
    saved = planning.optimisation_fingerprint(Config())
    now = planning.optimisation_fingerprint(full(**changed))
    ((section, options),) = changed.items()
    key = f"{section}.{next(iter(options))}"
    with pytest.raises(CheckpointError, match=rf"cannot resume .*: {re.escape(key)} .* → .*train\.resume_override"):
        planning.check_optimisation(saved, now, [], tmp_path)
    assert planning.check_optimisation(saved, now, [key], tmp_path) == [
        f"resume: {key} {saved[key]!r} → {now[key]!r} from here on (train.resume_override)"
    ]


def test_what_does_not_shape_the_optimisation_may_change_on_resume(tmp_path):
    saved = planning.optimisation_fingerprint(Config())
    now = planning.optimisation_fingerprint(
        full(train={"log_every": 1, "save_every": 5}, model={"gradient_checkpointing": True})
    )
    assert planning.check_optimisation(saved, now, [], tmp_path) == []


def test_old_checkpoints_and_new_options_are_not_compared(tmp_path):
    now = planning.optimisation_fingerprint(full(train={"lr": 1e-2}))
    assert "not compared" in planning.check_optimisation(None, now, [], tmp_path)[0]
    saved = {k: v for k, v in planning.optimisation_fingerprint(Config()).items() if k != "train.lr"}  # lr added since
    assert planning.check_optimisation(saved, now, [], tmp_path) == []


def test_an_override_must_name_a_checked_option(tmp_path):
    saved = planning.optimisation_fingerprint(Config())
    with pytest.raises(ConfigError, match=r"train.resume_override: \['train.lrr'\]"):
        planning.check_optimisation(saved, dict(saved), ["train.lrr"], tmp_path)
    with pytest.raises(ConfigError, match=r"train.resume_override: \['train.lrr'\]"):
        planning.check_overrides(["train.lrr", "train.lr"], saved)  # what a fresh run checks
    planning.check_overrides(["train.lr", "deepspeed.optimizer"], saved)


@pytest.mark.parametrize(
    ("section", "change"),
    [
        (
            "optimizer",
            {"params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "amsgrad": True}},
        ),
        ("scheduler", {"type": "WarmupCosineLR", "params": {"warmup_type": "log"}}),
        ("zero_optimization", {"stage": 2}),
        ("fp16", {"enabled": True, "loss_scale": 128}),
    ],
)
def test_the_deepspeed_jsons_own_optimisation_settings_refuse_a_resume(tmp_path, section, change):
    from bigrm.training.ds_config import resolve_path

    saved = planning.optimisation_fingerprint(Config())
    ds = json.loads(resolve_path(Config().train.deepspeed_config).read_text()) | {section: change}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    now = planning.optimisation_fingerprint(full(train={"deepspeed_config": str(tmp_path / "ds.json")}))
    with pytest.raises(CheckpointError, match=rf"deepspeed\.{section} .* → .*train\.resume_override"):
        planning.check_optimisation(saved, now, [], tmp_path)
    assert planning.check_optimisation(saved, now, [f"deepspeed.{section}"], tmp_path)


def test_max_steps_beyond_the_data_is_warned(tmp_path):
    data = dataset([[10, 12, 14, 16]])
    steps = len(plan(config(), data))
    assert planning.warnings(config(max_steps=steps), LossConfig(), data, plan(config(max_steps=steps), data)) == []
    said = planning.warnings(config(max_steps=steps + 5), LossConfig(), data, plan(config(max_steps=steps + 5), data))
    assert said == [
        f"warning: train.max_steps={steps + 5} but train.epochs=1 of this data give {steps} optimizer steps: the run "
        f"stops after {steps} (raise train.epochs for more)"
    ]


def test_a_training_set_of_ties_only_is_warned():
    data = dataset([[10, 12, 14]])
    tied = replace(data, train=[replace(g, labels=Labels((0, 0))) for g in data.train])
    assert planning.warnings(config(), LossConfig(), data, plan(config(), data)) == []
    said = planning.warnings(config(), LossConfig(), tied, plan(config(), tied))
    assert len(said) == 1 and said[0].startswith("warning: no training prompt has two completions of different rank")
    assert (
        planning.warnings(config(), LossConfig(tie_coef=0.1), tied, plan(config(), tied)) == []
    )  # ties are a term then
    one_ranked = replace(tied, train=[*tied.train[:-1], replace(tied.train[-1], labels=Labels((0, 1)))])
    assert planning.warnings(config(), LossConfig(), one_ranked, plan(config(), one_ranked)) == []


def test_a_resume_numbers_steps_once_as_the_logs_do():
    from pathlib import Path

    from bigrm.data.packing import Update

    updates = [Update([], 1, epoch, index) for epoch in range(2) for index in range(3)]
    step = Path("out/checkpoints/step-00000005")
    assert resumed_line(step, 5, updates) == (
        f"resumed from {step} at step 5: 5 of 6 optimizer steps done, 2 of them in epoch 2; continuing with step 6"
    )
    assert resumed_line(step, 6, updates).endswith("6 of 6 optimizer steps done, 3 of them in epoch 2; none left")
