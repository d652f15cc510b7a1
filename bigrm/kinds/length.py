"""The length-disentangled reward model (ODIN, arXiv 2402.07319; loss.length_head): a quality and a length output.

The ranking loss trains their sum r_Q + r_L, the preference score, so length in the labels has a place to go; the
correlation term ties r_L to completion length and r_Q away from it, the orthogonality term keeps the two head rows
apart (bigrm.objectives.length). The reward is r_Q. The export is the quality row alone, a plain 1-logit classifier,
with the length row recorded in config.json (LENGTH_HEAD_KEY) for analysis; eval reports both outputs' length
correlations.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from bigrm.config import DataConfig, LossConfig
from bigrm.data.packing import SegmentLabels
from bigrm.data.pipeline import Dataset
from bigrm.data.sequences import Group
from bigrm.errors import ConfigError
from bigrm.evaluation.correlation import pearson, spearman
from bigrm.kinds.scalar import Scalar
from bigrm.objectives.length import length_loss, length_terms
from bigrm.objectives.normaliser import Normaliser
from bigrm.objectives.ranking import ranking_loss

# config.json keys: a trained (checkpointed) two-output model; an export's length head row, for analysis
TRAINED_KEY = "bigrm_length_disentangled"
LENGTH_HEAD_KEY = "bigrm_length_head"


class Length(Scalar):
    name = "length"
    vector = True
    head_gram = True

    @staticmethod
    def outputs_for(data: DataConfig, loss: LossConfig) -> int | None:
        return 2 if loss.length_head else None

    @classmethod
    def for_run(cls, data: DataConfig, loss: LossConfig, dataset: Dataset) -> Length | None:
        if not loss.length_head:
            return None
        if data.attributes or dataset.stepwise:
            raise ConfigError("loss.length_head: trains on ranked rows, not data.attributes or stepwise rows")
        return cls()

    @classmethod
    def for_model(cls, config, stepwise_rows: bool) -> Length | None:
        return cls() if getattr(config, TRAINED_KEY, False) else None

    @property
    def outputs(self) -> int:
        return 2

    def record(self, config) -> None:
        setattr(config, TRAINED_KEY, True)

    def rewards(self, values: torch.Tensor) -> torch.Tensor:
        return values[:, 0]

    def share(self, group: Group, cfg: LossConfig) -> Normaliser:
        """The term's denominator: the update's prompts (each micro-batch's term weighs by its share of them)."""
        return replace(super().share(group, cfg), term=np.ones(1))

    def loss(self, values: torch.Tensor, labels: SegmentLabels, cfg: LossConfig, norm: Normaliser | None):
        """Also the (4,) float64 sums train_metrics logs: ρ_Q, ρ_L and |w_Q · w_L| weighted by prompts, the prompts."""
        n = len(labels.seg_group)
        values = values.double() if values.dtype == torch.float64 else values.float()
        outputs, gram = values[:n], values[n:] if len(values) > n else None  # gram: training only (head_gram)
        loss, stats = ranking_loss(outputs.sum(1), labels, cfg, *Normaliser.ranking_sums(norm))
        if labels.num_groups == 0:  # placeholder micro-batch (see ranking_loss)
            return loss + values.sum() * 0.0, stats, self.new_sums(values.device)
        terms = length_terms(outputs, labels.seg_length, gram)
        share = labels.num_groups / (labels.num_groups if norm is None else float(norm.term[0]))
        loss = loss + share * length_loss(terms, cfg.length_coef, cfg.orthogonal_coef)
        groups = torch.tensor([float(labels.num_groups)], dtype=torch.float64, device=values.device)
        return loss, stats, torch.cat([terms.detach().double() * groups, groups])

    def new_sums(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(4, dtype=torch.float64, device=device)

    def train_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        groups = max(float(sums[3]), 1.0)
        names = ("length_corr_quality", "length_corr_length", "head_dot")
        return {name: float(s) / groups for name, s in zip(names, sums[:3], strict=True)}

    def eval_part(self, values: torch.Tensor, labels: SegmentLabels):
        n = len(labels.seg_group)
        return (values[:n].cpu(), labels.seg_length.cpu()) if n and labels.seg_length is not None else None

    def eval_metrics(self, parts: list) -> dict[str, float]:
        """Each output's Pearson and Spearman correlation with completion length, over every held-out completion."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return {}
        v, lengths = torch.cat([p[0] for p in parts]).double(), torch.cat([p[1] for p in parts]).double()
        out = {}
        for i, head in enumerate(("quality", "length")):
            out[f"length_pearson_{head}"] = pearson(v[:, i], lengths)
            out[f"length_spearman_{head}"] = spearman(v[:, i], lengths)
        return out

    def export_values(self, values: torch.Tensor) -> torch.Tensor:
        return values[:, 0]

    def export_form(self, classifier: nn.Module, state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict]:
        """The 1-logit classifier of the quality row; the length row (and bias) recorded under LENGTH_HEAD_KEY."""
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(classifier.config)
        delattr(config, TRAINED_KEY)
        config.num_labels, config.problem_type = 1, "regression"
        config.id2label, config.label2id = {0: "LABEL_0"}, {"LABEL_0": 0}  # what num_labels=1 loads as
        weight, bias = state["score.weight"], state.get("score.bias")
        length_row = {"weight": weight[1].float().tolist(), "bias": None if bias is None else float(bias[1])}
        setattr(config, LENGTH_HEAD_KEY, length_row)
        with torch.device("meta"):  # only its class and config are written: the weights are `state`
            model = AutoModelForSequenceClassification.from_config(config)
        out = {**state, "score.weight": weight[:1]}
        if bias is not None:
            out["score.bias"] = bias[:1]
        return model, out
