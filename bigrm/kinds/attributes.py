"""The multi-attribute reward model: one output per data.attributes name (bigrm.model.heads says what they mean).

The reward is the scalar r = Σ_a w_a v_a; the loss is the ranking loss of r plus loss.attribute_coef times the rating
term (bigrm.objectives.ratings), its metrics are bigrm.evaluation.ratings'. Exports keep the A outputs (the config
records the head) or, with `bigrm export --merge-attributes`, become the 1-logit model of r.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from bigrm.config import DataConfig, LossConfig
from bigrm.data.packing import SegmentLabels
from bigrm.data.pipeline import Dataset
from bigrm.data.sequences import Group
from bigrm.evaluation import ratings as rating_metrics
from bigrm.kinds.base import RewardKind
from bigrm.kinds.scalar import Scalar
from bigrm.model.heads import CONFIG_KEY, AttributeHead, merged_head, read_head, record_head
from bigrm.objectives import ratings
from bigrm.objectives.normaliser import Normaliser
from bigrm.objectives.ranking import ranking_loss

# config.json key of a merged attribute export: the AttributeHead (names, weights, scale) its one logit combines
MERGED_KEY = "bigrm_merged_attributes"


class Attributes(Scalar):
    name = "attributes"
    vector = True

    def __init__(self, head: AttributeHead):
        self.head = head

    @staticmethod
    def outputs_for(data: DataConfig, loss: LossConfig) -> int | None:
        return len(data.attributes) or None

    @classmethod
    def for_run(cls, data: DataConfig, loss: LossConfig, dataset: Dataset) -> Attributes | None:
        # the targets' scale: the training ratings'
        return cls(AttributeHead.of(data.attributes, loss, dataset.attribute_stats)) if data.attributes else None

    @classmethod
    def for_model(cls, config, stepwise_rows: bool) -> Attributes | None:
        head = read_head(config)
        return cls(head) if head else None

    @property
    def outputs(self) -> int:
        return len(self.head.names)

    def record(self, config) -> None:
        record_head(config, self.head)

    def data_defaults(self) -> dict:
        """Rated rows and rating lists are read under the head's attribute names."""
        return {"data.attributes": list(self.head.names)}

    def rewards(self, values: torch.Tensor) -> torch.Tensor:
        return self.head.scalar(values)

    def share(self, group: Group, cfg: LossConfig) -> Normaliser:
        return replace(super().share(group, cfg), term=ratings.rating_sums(group))

    def loss(self, values: torch.Tensor, labels: SegmentLabels, cfg: LossConfig, norm: Normaliser | None):
        """Also the (2, A) float64 rating sums that train_metrics logs."""
        outputs = values.double() if values.dtype == torch.float64 else values.float()  # (N, A)
        loss, stats = ranking_loss(self.head.scalar(outputs), labels, cfg, *Normaliser.ranking_sums(norm))
        if labels.num_groups == 0:  # placeholder micro-batch (see ranking_loss)
            return loss, stats, self.new_sums(values.device)
        sq_err, weights = ratings.rating_terms(outputs, labels, self.head)
        denominator = weights if norm is None else torch.as_tensor(norm.term).to(outputs)
        loss = loss + cfg.attribute_coef * ratings.rating_loss(sq_err, denominator)
        return loss, stats, torch.stack([sq_err, weights]).detach().double()

    def new_sums(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(2, len(self.head.names), dtype=torch.float64, device=device)

    def train_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return rating_metrics.train_metrics(sums.reshape(2, -1), self.head)

    def loss_terms(self, sums: torch.Tensor | None, cfg: LossConfig) -> dict[str, tuple[float, float]]:
        """The rating term over the prompts: the loss's rating_loss with their sums as denominators."""
        if sums is None:
            return {}
        sq_err, weights = sums.reshape(2, -1).double()
        if not weights.any():  # no rating among them
            return {}
        return {"rating_loss": (float(ratings.rating_loss(sq_err, weights)), cfg.attribute_coef)}

    def eval_part(self, values: torch.Tensor, labels: SegmentLabels):
        if not labels.num_groups or labels.seg_attributes is None:
            return None
        return values.cpu(), labels.seg_attributes.cpu()

    def eval_metrics(self, parts: list) -> dict[str, float]:
        """Per attribute over every rank's completions (rank correlations need them all: gathered, not summed)."""
        parts = [p for p in parts if p is not None]
        if not parts:  # no ratings to report (a scored file without rating columns)
            return {}
        v, r = torch.cat([p[0] for p in parts]), torch.cat([p[1].double() for p in parts])
        return rating_metrics.report(v, r, self.head)

    def merge(self, classifier: nn.Module) -> RewardKind:
        """The plain 1-output classifier whose logit is Σ_a w_a v_a, in place, recording the head under MERGED_KEY."""
        old = classifier.score
        weight, bias = merged_head(old.weight.data, None if old.bias is None else old.bias.data, self.head)
        shape = dict(bias=bias is not None, dtype=weight.dtype, device=weight.device)
        classifier.score = nn.Linear(old.in_features, 1, **shape)
        with torch.no_grad():
            classifier.score.weight.copy_(weight)
            if bias is not None:
                classifier.score.bias.copy_(bias)
        config = classifier.config
        delattr(config, CONFIG_KEY)
        config.id2label, config.label2id = {0: "LABEL_0"}, {"LABEL_0": 0}  # what num_labels=1 loads as
        config.num_labels, config.problem_type = 1, "regression"
        setattr(config, MERGED_KEY, self.head.to_dict())
        return Scalar()

    def score_fields(self, values: list | None, step_values: list | None) -> dict:
        """{name: predicted rating per completion, on the ratings' own scale (AttributeHead.raw)}."""
        if values is None:
            return {}
        raw = self.head.raw(torch.tensor(values, dtype=torch.float64)).T.tolist()
        return {"attributes": dict(zip(self.head.names, raw, strict=True))}
