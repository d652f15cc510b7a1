"""What a multi-attribute value head means: attribute names, the scalar's weights and the targets' scale.

With data.attributes = [a_1, ..., a_A] the value head `score` is Linear(hidden, A): output v_a of a completion
predicts its rating of a_a. Targets are t_a = (rating_a - mean_a) / std_a, the mean and std of attribute a's present
ratings over the training data (loss.attribute_targets=raw: mean 0, std 1), so v_a's raw-scale rating is
mean_a + std_a * v_a. The scalar reward that ranks completions is r = Σ_a w_a v_a (loss.attribute_weights); it is
what the ranking loss, the ranking metrics and the merged 1-logit export (`merged_head`) use. Its loss term is
bigrm.objectives.ratings, its metrics bigrm.evaluation.ratings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from bigrm.config import LossConfig, attribute_weights

CONFIG_KEY = "bigrm_attributes"  # config.json key holding AttributeHead.to_dict(), written by every attribute export


@dataclass(frozen=True)
class AttributeHead:
    """The meaning of an A-output value head: attribute names, the scalar's weights, the targets' scale."""

    names: tuple[str, ...]
    weights: tuple[float, ...]  # r = Σ_a weights[a] · v_a
    mean: tuple[float, ...]  # t_a = (rating_a - mean[a]) / std[a]
    std: tuple[float, ...]

    @staticmethod
    def of(attributes: list[str], loss: LossConfig, stats: dict) -> AttributeHead:
        """The head of data.attributes; `stats` is rating_stats of the training examples."""
        names, weights = tuple(attributes), attribute_weights(attributes, loss)
        if loss.attribute_targets == "raw":
            return AttributeHead(names, weights, (0.0,) * len(names), (1.0,) * len(names))
        return AttributeHead(names, weights, tuple(stats["mean"]), tuple(stats["std"]))

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
