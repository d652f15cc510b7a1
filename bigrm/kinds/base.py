"""What every kind of reward model answers, and the plain scalar model's answers.

A kind is what the value head means: how many outputs it has and how they become the one reward that ranks
completions, which label fields its loss term reads and how that term is normalised over an update, what it logs
and reports, how it is written for its consumers and what `bigrm score` adds to each row. The trainer, evaluation,
export and scoring call the kind; none of them asks which kind it is. bigrm.kinds lists the kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bigrm.config import DataConfig, LossConfig
from bigrm.data.packing import SegmentLabels
from bigrm.data.pipeline import Dataset
from bigrm.data.sequences import Group
from bigrm.errors import ExportError
from bigrm.model.adapters import ADAPTER
from bigrm.model.reward_model import RewardModel, load_classifier
from bigrm.model.sequence_parallel import SequenceSplit
from bigrm.objectives.normaliser import Normaliser
from bigrm.objectives.ranking import Stats, ranking_loss

Loss = tuple[torch.Tensor, Stats, torch.Tensor | None]  # (loss, ranking statistics, the kind's additive sums)


class RewardKind:
    """The scalar reward model: one output, the reward; the ranking loss (bigrm.objectives.ranking) alone."""

    name: ClassVar[str] = "scalar"
    vector: ClassVar[bool] = False  # the model returns every output of the head ((N, A)), not one reward ((N,))
    head_gram: ClassVar[bool] = False  # in training the model also returns the head rows' products (RewardModel)
    one_model: ClassVar[bool] = True  # its export is one classifier (bigrm merge averages those)

    # choosing the kind -------------------------------------------------------------------------------------------

    @staticmethod
    def outputs_for(data: DataConfig, loss: LossConfig) -> int | None:
        """The value head's width a run of this kind needs, known from the options alone; None: not this kind."""
        return 1

    @classmethod
    def for_run(cls, data: DataConfig, loss: LossConfig, dataset: Dataset) -> RewardKind | None:
        """This kind, when a run's data and loss options and its training data call for it."""
        return cls()

    @classmethod
    def for_model(cls, config, stepwise_rows: bool) -> RewardKind | None:
        """This kind, when a trained model's transformers config records it (or, for scoring, the rows need it)."""
        return cls()

    @property
    def outputs(self) -> int:
        return 1

    def record(self, config) -> None:
        """Write into a transformers config what exports, scoring and merging read back (for_model)."""

    @property
    def adapters(self) -> tuple[str, ...]:
        """The LoRA adapter sets a run of this kind trains (bigrm.model.adapters.add_lora)."""
        return (ADAPTER,)

    def reward_model(self, classifier: nn.Module, attn: str, split: SequenceSplit | None = None) -> nn.Module:
        """What forwards packed batches through the classifier (or what load_export gave): the model's outputs;
        `split`: train.sequence_parallel's exchange (None: each rank runs whole rows)."""
        return RewardModel(classifier, attn, self.vector, self.head_gram, split)

    def data_defaults(self) -> dict[str, Any]:
        """Data options (dotted keys) that scoring this kind's model reads rows with, unless given."""
        return {}

    def rewards(self, values: torch.Tensor) -> torch.Tensor:
        """The model's outputs ((N + P,), or (N, A) for vector kinds) → the rewards that rank completions."""
        return values

    # training ----------------------------------------------------------------------------------------------------

    def share(self, group: Group, cfg: LossConfig) -> Normaliser:
        """One prompt's share of an update's loss denominators, from its labels alone."""
        return Normaliser.ranking(group, cfg)

    def loss(self, values: torch.Tensor, labels: SegmentLabels, cfg: LossConfig, norm: Normaliser | None) -> Loss:
        """What training minimises for a micro-batch, with the update's denominators (`norm`; None: its own)."""
        n = len(labels.seg_group)
        return (*ranking_loss(values[:n], labels, cfg, *Normaliser.ranking_sums(norm)), None)

    def new_sums(self, device: torch.device) -> torch.Tensor | None:
        """Zeros of the additive sums `loss` returns beside the ranking statistics (None: it returns none)."""
        return None

    def train_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """What is logged from a log window's sums (summed over micro-batches and ranks)."""
        return {}

    def loss_terms(self, sums: torch.Tensor | None, cfg: LossConfig) -> dict[str, tuple[float, float]]:
        """The kind's own terms of the loss, {name: (value, coef)}, from a set of prompts' sums (None: none summed):
        logged alone and added into the logged loss (bigrm.objectives.ranking.metrics)."""
        return {}

    # evaluation --------------------------------------------------------------------------------------------------

    def eval_part(self, values: torch.Tensor, labels: SegmentLabels) -> Any:
        """What a micro-batch of held-out prompts (or a scored file) adds to this kind's metrics beyond the ranking
        ones, on the CPU; None: nothing."""
        return None

    def eval_metrics(self, parts: list[Any]) -> dict[str, float]:
        """The kind's metrics from every rank's eval_part, in order (None parts left out)."""
        return {}

    # export and scoring ------------------------------------------------------------------------------------------

    def export_form(self, classifier: nn.Module, state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict]:
        """The model class and weights an export writes: the sequence classifier itself."""
        return classifier, state

    def export_values(self, values: torch.Tensor) -> torch.Tensor:
        """The part of the trained model's outputs that its export reproduces (its plain_rewards)."""
        return values

    def member_states(self, state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """A LoRA run's trained weights → those of each model its export writes (an ensemble: one per member)."""
        return [state]

    def merge(self, classifier: nn.Module) -> RewardKind:
        """`bigrm export --merge-attributes`: the classifier rewritten in place with one output, and its new kind."""
        raise ExportError("--merge-attributes: the model has a scalar head, not attribute heads (data.attributes)")

    def load_export(self, path: Path, dtype: torch.dtype | str, attn: str, tokenizer) -> nn.Module:
        """An exported directory of this kind, loaded as the classifier bigrm scores with."""
        return load_classifier(str(path), dtype, attn, tokenizer, num_labels=self.outputs)

    def plain_rewards(self, dest: Path, seqs: list[list[int]], device, steps: list | None = None) -> torch.Tensor:
        """(S,) rewards ((S, A) logits of an A-output head) from the exported directory, each sequence forwarded
        alone as any transformers user would."""
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(dest).to(device).eval()
        with torch.no_grad():
            out = [model(input_ids=torch.tensor([s], device=device)).logits[0].float() for s in seqs]
        if not out:
            return torch.zeros(0)
        logits = torch.stack(out).cpu()  # (S, num_labels)
        return logits if model.config.num_labels > 1 else logits[:, 0]

    def score_fields(self, values: list | None, step_values: list | None) -> dict:
        """What `bigrm score` adds to a scored row beside `rewards`, from the head's outputs per completion and the
        values at its step ends."""
        return {}
