"""Multi-attribute reward heads: what an A-output value head means, its rating loss, and its metrics.

With data.attributes = [a_1, ..., a_A] the value head `score` is Linear(hidden, A): output v_a of a completion
predicts its rating of a_a. Targets are t_a = (rating_a - mean_a) / std_a, the mean and std of attribute a's present
ratings over the training data (loss.attribute_targets=raw: mean 0, std 1), so v_a's raw-scale rating is
mean_a + std_a * v_a. The scalar reward that ranks completions is r = Σ_a w_a v_a (loss.attribute_weights); it is
what the ranking loss, the ranking metrics and the merged 1-logit export (`merged_head`) use.

The rating term of the loss (bigrm.loss.total_loss adds it, times loss.attribute_coef) is, over an optimizer step,
    (1/A) Σ_a  Σ_{present ratings i of a} w_g(i) (v_ia - t_ia)²  /  Σ_{present ratings i of a} w_g(i)
with w_g(i) the weight of completion i's row; a missing rating (NaN) is masked out of both sums, and an attribute
with no rating in the step adds 0. The step's denominators come from labels alone (`rating_sums`), like the ranking
loss's (bigrm.loss.denominators).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from bigrm.config import Config
from bigrm.correlation import pearson, spearman
from bigrm.data import Example
from bigrm.packing import SegmentLabels
from bigrm.sequences import Group

CONFIG_KEY = "bigrm_attributes"  # config.json key holding AttributeHead.to_dict(), written by every attribute export


@dataclass(frozen=True)
class AttributeHead:
    """The meaning of an A-output value head: attribute names, the scalar's weights, the targets' scale."""

    names: tuple[str, ...]
    weights: tuple[float, ...]  # r = Σ_a weights[a] · v_a
    mean: tuple[float, ...]  # t_a = (rating_a - mean[a]) / std[a]
    std: tuple[float, ...]

    @staticmethod
    def of(cfg: Config, stats: dict) -> AttributeHead:
        """The head of cfg's attributes; `stats` is rating_stats of the training examples."""
        names = tuple(cfg.data.attributes)
        if cfg.loss.attribute_targets == "raw":
            return AttributeHead(names, weights(cfg), (0.0,) * len(names), (1.0,) * len(names))
        return AttributeHead(names, weights(cfg), tuple(stats["mean"]), tuple(stats["std"]))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(raw: dict) -> AttributeHead:
        return AttributeHead(*(tuple(raw[f.name]) for f in dataclasses.fields(AttributeHead)))

    def _vector(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device)

    def scalar(self, values: torch.Tensor) -> torch.Tensor:
        """(N, A) head outputs → (N,) the scalar reward."""
        return values @ self._vector(self.weights, values)

    def targets(self, ratings: torch.Tensor) -> torch.Tensor:
        """(N, A) raw ratings → (N, A) what the outputs regress to (NaN stays NaN)."""
        return (ratings - self._vector(self.mean, ratings)) / self._vector(self.std, ratings)

    def raw(self, values: torch.Tensor) -> torch.Tensor:
        """(N, A) head outputs → (N, A) predicted ratings on the ratings' own scale."""
        return values * self._vector(self.std, values) + self._vector(self.mean, values)


def weights(cfg: Config) -> tuple[float, ...]:
    """loss.attribute_weights, or 1 each (the sum) when it is empty."""
    return tuple(float(w) for w in cfg.loss.attribute_weights) or (1.0,) * len(cfg.data.attributes)


def rating_stats(examples: list[Example], num_attributes: int) -> dict:
    """{"mean", "std"}: per attribute, over the examples' present ratings (std 1 where they are constant or absent,
    mean 0 where absent, so targets stay finite)."""
    ratings = np.array([r for e in examples for r in (e.labels.attributes or ())], dtype=np.float64).reshape(
        -1, num_attributes
    )
    mean, std = [], []
    for a in range(num_attributes):
        present = ratings[~np.isnan(ratings[:, a]), a]
        mean.append(float(present.mean()) if len(present) else 0.0)
        spread = float(present.std()) if len(present) else 0.0
        std.append(spread if spread > 0 else 1.0)
    return {"mean": mean, "std": std}


def read_head(config) -> AttributeHead | None:
    """The attribute head recorded in a transformers config, or None for a scalar reward model."""
    raw = getattr(config, CONFIG_KEY, None)
    return AttributeHead.from_dict(raw) if raw else None


def record_head(config, head: AttributeHead) -> None:
    """Make `config` describe an A-output regression classifier: labels named by attribute, the head's meaning kept."""
    config.num_labels = len(head.names)
    config.id2label = dict(enumerate(head.names))
    config.label2id = {name: i for i, name in enumerate(head.names)}
    config.problem_type = "regression"
    setattr(config, CONFIG_KEY, head.to_dict())


def merged_head(weight: torch.Tensor, bias: torch.Tensor | None, head: AttributeHead):
    """The 1-output Linear's (weight (1, H), bias (1,) or None) whose output is the scalar Σ_a w_a v_a of the A-output
    head (weight (A, H), bias (A,)): the rows combined by the weights, in float64 then cast back."""
    w = torch.tensor(head.weights, dtype=torch.float64)
    merged_w = (w @ weight.double())[None].to(weight.dtype)
    merged_b = None if bias is None else (w @ bias.double()).reshape(1).to(bias.dtype)
    return merged_w, merged_b


def rating_sums(group: Group) -> np.ndarray:
    """(A,) Σ of the group's weight over its present ratings of each attribute: its share of the step's denominators."""
    ratings = np.asarray(group.labels.attributes, dtype=np.float64)  # (K, A)
    return group.labels.weight * (~np.isnan(ratings)).sum(0)


def rating_terms(values: torch.Tensor, labels: SegmentLabels, head: AttributeHead) -> tuple[torch.Tensor, torch.Tensor]:
    """(A,) Σ w_g (v - t)² over each attribute's present ratings, and (A,) Σ w_g over them."""
    ratings = labels.seg_attributes.to(values.dtype)  # (N, A) NaN where missing
    present = ~torch.isnan(ratings)
    w = labels.group_weight.to(values.dtype)[labels.seg_group][:, None].expand_as(ratings)  # (N, A) its row's weight
    err = (values - head.targets(ratings).nan_to_num(0.0)).square()
    return torch.where(present, w * err, 0.0).sum(0), torch.where(present, w, 0.0).sum(0)


def rating_loss(sq_err: torch.Tensor, weight_sums: torch.Tensor) -> torch.Tensor:
    """The rating term from rating_terms' (A,) sums over the step (denominators: the step's rating_sums)."""
    return (sq_err / weight_sums.clamp(min=1e-12)).mean()


def train_metrics(sums: torch.Tensor, head: AttributeHead) -> dict[str, float]:
    """Logged per attribute from the (2, A) sums of rating_terms: `<name>/mse`, in the targets' scale."""
    sq_err, weights = sums.tolist()
    return {f"{n}/mse": e / w for n, e, w in zip(head.names, sq_err, weights, strict=True) if w > 0}


def report(values: torch.Tensor, ratings: torch.Tensor, head: AttributeHead) -> dict[str, float]:
    """Per attribute over its present ratings: `<name>/mse` of the predicted raw-scale rating, `<name>/pearson` and
    `<name>/spearman` (ties share their average rank) of output and rating, `<name>/num_ratings`. A correlation with
    a constant side is left out."""
    out: dict[str, float] = {}
    predicted = head.raw(values.double())
    for a, name in enumerate(head.names):
        present = ~torch.isnan(ratings[:, a])
        v, r = predicted[present, a], ratings[present, a].double()
        out[f"{name}/num_ratings"] = int(present.sum())
        if not len(r):
            continue
        out[f"{name}/mse"] = float((v - r).square().mean())
        for key, value in (("pearson", pearson(v, r)), ("spearman", spearman(v, r))):
            if value is not None and math.isfinite(value):
                out[f"{name}/{key}"] = value
    return out
