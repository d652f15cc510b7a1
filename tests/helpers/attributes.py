"""Attribute names and weights of the attribute tests, and a plain transformers reading of an N-head export."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

NAMES = ("helpfulness", "correctness", "verbosity")


def plain_logits(path, groups, **kw) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.from_numpy(s)[None]).logits[0] for g in groups for s in g.seqs])


WEIGHTS = [1.0, 0.5, -0.5]
