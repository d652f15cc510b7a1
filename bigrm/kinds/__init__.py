"""Reward kinds: what a reward model's value head means, one module each (kinds.base says what a kind answers).

    scalar      one reward per completion (kinds.scalar)
    steps       a process reward model, values at reasoning steps' ends (kinds.steps)
    attributes  one output per rated attribute, their weighted sum the reward (kinds.attributes)
    length      quality and length outputs, the quality one the reward (kinds.length, loss.length_head)
    ensemble    M LoRA members' rewards, their aggregation the reward (kinds.ensemble, loss.ensemble)

A new kind is a module with a RewardKind subclass and its place in KINDS.
"""

from __future__ import annotations

from bigrm.config import DataConfig, LossConfig
from bigrm.data.pipeline import Dataset
from bigrm.kinds.attributes import Attributes
from bigrm.kinds.base import RewardKind
from bigrm.kinds.ensemble import Ensemble
from bigrm.kinds.length import Length
from bigrm.kinds.scalar import Scalar
from bigrm.kinds.steps import Steps

KINDS: tuple[type[RewardKind], ...] = (
    Ensemble,
    Length,
    Attributes,
    Steps,
    Scalar,
)  # the first that claims a run or a model is it


def outputs_for(data: DataConfig, loss: LossConfig) -> int:
    """The value head's width a run needs, known from its data and loss options before any data is read."""
    return next(n for n in (kind.outputs_for(data, loss) for kind in KINDS) if n is not None)


def for_run(data: DataConfig, loss: LossConfig, dataset: Dataset) -> RewardKind:
    """The kind a run trains, from its data and loss options and its training data."""
    return next(k for k in (kind.for_run(data, loss, dataset) for kind in KINDS) if k is not None)


def for_model(config, stepwise_rows: bool = False) -> RewardKind:
    """The kind a trained model's transformers config records; `stepwise_rows`: it is to score stepwise rows, which
    any one-output model scores at each step's end as a process reward model."""
    return next(k for k in (kind.for_model(config, stepwise_rows) for kind in KINDS) if k is not None)


__all__ = [
    "KINDS",
    "Attributes",
    "Ensemble",
    "Length",
    "RewardKind",
    "Scalar",
    "Steps",
    "for_model",
    "for_run",
    "outputs_for",
]
