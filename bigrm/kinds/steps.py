"""The process reward model (PRM): one value per token, read at each reasoning step's end and at the final token.

Trained on stepwise rows (data.step_separator) with the ranking loss plus loss.step_coef times the step loss
(bigrm.objectives.steps); its eval adds ProcessBench-style step metrics (bigrm.evaluation.steps).

It is exported as the 2-label token classifier that PRM users load, `AutoModelForTokenClassification` /
`pipeline("token-classification")` as TRL documents for its PRMTrainer models: its head's rows are (0, w) and biases
(0, b), so the logits at a token are (0, v) and softmax(...)[1] = σ(v), the probability that the step ending there is
correct (label 1 = correct, as TRL's labels), while v = logits[1] - logits[0] is the value bigrm trained, at step
ends and at the final token. Its config records the separator, the step layout and the step token (SEPARATOR_KEY,
LAYOUT_KEY, STEP_TOKEN_KEY), which `bigrm score`/`eval` read stepwise rows with; `bigrm score` reports σ(v) per step.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigrm.config import DataConfig, LossConfig
from bigrm.data.packing import SegmentLabels
from bigrm.data.pipeline import Dataset
from bigrm.data.sequences import Group
from bigrm.errors import ExportError
from bigrm.evaluation.steps import step_report
from bigrm.kinds.scalar import Scalar
from bigrm.model.attention import hf_attn_implementation
from bigrm.objectives.normaliser import Normaliser
from bigrm.objectives.steps import step_denominator, step_loss

# config.json keys of data.step_separator, step_layout and step_token, set when the model was trained on stepwise
# rows: the export is a PRM
SEPARATOR_KEY = "bigrm_step_separator"
LAYOUT_KEY = "bigrm_step_layout"
STEP_TOKEN_KEY = "bigrm_step_token"
# the layout of a PRM exported before layouts were recorded: the only one there was
UNRECORDED_LAYOUT = "joined"


class Steps(Scalar):
    name = "steps"

    def __init__(self, separator: str | None = None, layout: str = DataConfig.step_layout, step_token: str = ""):
        self.separator = separator  # None: scoring stepwise rows with a model that records none
        self.layout, self.step_token = layout, step_token

    @classmethod
    def for_run(cls, data: DataConfig, loss: LossConfig, dataset: Dataset) -> Steps | None:
        return cls(data.step_separator, data.step_layout, data.step_token) if dataset.stepwise else None

    @classmethod
    def for_model(cls, config, stepwise_rows: bool) -> Steps | None:
        separator = getattr(config, SEPARATOR_KEY, None)
        if separator is None:
            return cls() if stepwise_rows else None
        layout = getattr(config, LAYOUT_KEY, UNRECORDED_LAYOUT)
        return cls(separator, layout, getattr(config, STEP_TOKEN_KEY, ""))

    def record(self, config) -> None:
        setattr(config, SEPARATOR_KEY, self.separator)
        setattr(config, LAYOUT_KEY, self.layout)
        setattr(config, STEP_TOKEN_KEY, self.step_token)

    def data_defaults(self) -> dict:
        """Stepwise rows are read and laid out as the model was trained (nothing recorded: the options' defaults)."""
        if self.separator is None:
            return {}
        keys = ("data.step_separator", "data.step_layout", "data.step_token")
        return dict(zip(keys, (self.separator, self.layout, self.step_token), strict=True))

    def share(self, group: Group, cfg: LossConfig) -> Normaliser:
        return replace(super().share(group, cfg), term=np.array([step_denominator(group, cfg)], dtype=np.float64))

    def loss(self, values: torch.Tensor, labels: SegmentLabels, cfg: LossConfig, norm: Normaliser | None):
        loss, stats, _ = super().loss(values, labels, cfg, norm)
        if labels.num_steps:
            n = len(labels.seg_group)
            step, sums = step_loss(values[n:], labels, cfg, None if norm is None else float(norm.term[0]))
            loss = loss + cfg.step_coef * step
            stats = replace(stats, **sums)
        return loss, stats, None

    def eval_part(self, values: torch.Tensor, labels: SegmentLabels):
        if not labels.num_steps:
            return None
        return values[len(labels.seg_group) :].cpu(), labels.step_label.cpu(), labels.step_seg.cpu()

    def eval_metrics(self, parts: list) -> dict[str, float]:
        parts = [p for p in parts if p is not None]  # AUROC and first errors need every step of every rank
        if not parts:
            return {}
        offsets = [0]  # solutions numbered across micro-batches
        for _, _, seg in parts:
            offsets.append(offsets[-1] + int(seg.max()) + 1)
        return step_report(
            torch.cat([v for v, _, _ in parts]),
            torch.cat([y for _, y, _ in parts]),
            torch.cat([seg + o for (_, _, seg), o in zip(parts, offsets, strict=False)]),
        )

    def export_form(self, classifier: nn.Module, state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict]:
        return token_classifier(classifier.config, state)

    def load_export(self, path: Path, dtype: torch.dtype | str, attn: str, tokenizer) -> nn.Module:
        return value_classifier(str(path), dtype, attn)

    def plain_rewards(self, dest: Path, seqs: list[list[int]], device, steps: list | None = None) -> torch.Tensor:
        """(S + P,): the value logits[1] - logits[0] at each final token, then at each step end (`steps`: per
        sequence its step-end indices), each sequence forwarded alone through the token classifier."""
        from transformers import AutoModelForTokenClassification

        model = AutoModelForTokenClassification.from_pretrained(dest).to(device).eval()
        last, at_steps = [], []
        with torch.no_grad():
            for s, ends in zip(seqs, steps or [[]] * len(seqs), strict=True):
                logits = model(input_ids=torch.tensor([s], device=device)).logits[0].float()  # (T, 2)
                v = (logits[:, 1] - logits[:, 0]).cpu()
                last.append(v[-1])
                at_steps.append(v[list(ends)])
        return torch.cat([torch.stack(last), *at_steps]) if last else torch.zeros(0)

    def score_fields(self, values: list | None, step_values: list | None) -> dict:
        if step_values is None:
            return {}
        return {"step_rewards": [torch.sigmoid(torch.tensor(v, dtype=torch.float64)).tolist() for v in step_values]}


def _token_head(model: nn.Module) -> str:
    """The name of a token classifier's output Linear (`score` for most decoders, `classifier` for some)."""
    names = [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
    if len(names) != 1:
        raise ExportError(f"{type(model).__name__}: expected one output Linear beside the backbone, found {names}")
    return names[0]


def token_classifier(config, state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(2-label *ForTokenClassification, its state) whose logits are (0, v) where the 1-label classifier's are v."""
    from transformers import AutoModelForTokenClassification

    config = copy.deepcopy(config)
    config.num_labels = 2
    config.id2label, config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    config.architectures = None
    with torch.device("meta"):  # only its class and config are written: the weights are `state`
        model = AutoModelForTokenClassification.from_config(config)
    model.config.architectures = [type(model).__name__]
    head = _token_head(model)
    w = state["score.weight"]  # (1, H)
    bias = state.get("score.bias", torch.zeros(1, dtype=w.dtype))
    out = {k: v for k, v in state.items() if not k.startswith("score.")}
    out[f"{head}.weight"] = torch.cat([torch.zeros_like(w), w])
    if getattr(model, head).bias is not None:
        out[f"{head}.bias"] = torch.cat([torch.zeros_like(bias), bias])
    elif bias.abs().max() > 0:
        raise ExportError(f"{type(model).__name__} has no head bias to carry the value head's bias")
    return model, out


def value_classifier(path: str, dtype, attn: str) -> nn.Module:
    """A token-classifier export loaded back as the 1-label classifier bigrm trains and scores with (v = logit 1 -
    logit 0 at every token)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    tokens = AutoModelForTokenClassification.from_pretrained(path, dtype=dtype)
    head = getattr(tokens, _token_head(tokens))
    config = AutoConfig.from_pretrained(path, num_labels=1)
    config.architectures = None
    config._attn_implementation = hf_attn_implementation(attn)
    model = AutoModelForSequenceClassification.from_config(config, dtype=tokens.dtype)
    state = {k: v for k, v in tokens.state_dict().items() if k.startswith(tokens.base_model_prefix + ".")}
    state["score.weight"] = (head.weight[1] - head.weight[0])[None]
    if model.score.bias is not None:
        b = head.bias if head.bias is not None else torch.zeros(2, dtype=tokens.dtype)
        state["score.bias"] = (b[1] - b[0])[None]
    model.load_state_dict(state, strict=True)
    return model.eval()
