"""Metrics of a multi-attribute head (bigrm.model.heads): the logged training MSE and the eval report per attribute."""

from __future__ import annotations

import math

import torch

from bigrm.evaluation.correlation import pearson, spearman
from bigrm.model.heads import AttributeHead


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
