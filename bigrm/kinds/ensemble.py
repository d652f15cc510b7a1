"""The ensemble reward model (loss.ensemble = M; Coste et al. arXiv 2310.02743, Eisenstein et al. arXiv 2312.09244).

M members trained in one run, each a LoRA adapter set with its own head row (bigrm.model.ensemble), drawn in turn
from the run's seeded RNG and trained on its own bootstrap weights of the prompts (bigrm.objectives.ensemble): the
loss is the sum of the members' ranking losses. The model's outputs are the members' rewards, (N, M); the reward is
their aggregation (loss.ensemble_reward: mean, min, or mean - λ·std), which the ranking statistics, the logged
`loss` and `pairwise_accuracy` describe; `members_loss` (the minimised sum) and each member's accuracy are logged
beside them, and eval adds per-member and mean accuracy and the spread's AUROC (bigrm.evaluation.ensemble).

The export is M plain 1-logit classifiers (member_0/ ... : each member's adapters merged into the base) beside the
ensemble's config.json, which records the members and the aggregation; `bigrm score` and `bigrm serve` load all
of them and return each completion's mean, std, min and conservative value (score_fields).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigrm.config import DataConfig, LossConfig
from bigrm.data.packing import SegmentLabels, prompt_id
from bigrm.data.pipeline import Dataset
from bigrm.data.sequences import Group
from bigrm.errors import ConfigError, DataError
from bigrm.evaluation import ensemble as metrics
from bigrm.kinds.scalar import Scalar
from bigrm.model.adapters import ADAPTER
from bigrm.model.ensemble import MEMBER, AdapterEnsemble, MemberEnsemble, Members, member_names
from bigrm.model.reward_model import load_classifier
from bigrm.model.sequence_parallel import SequenceSplit
from bigrm.objectives.ensemble import bootstrap_weights, member_losses
from bigrm.objectives.normaliser import Normaliser
from bigrm.objectives.ranking import ranking_loss

CONFIG_KEY = "bigrm_ensemble"  # config.json: {members, bootstrap, reward, lambda}


class Ensemble(Scalar):
    name = "ensemble"
    vector = True
    one_model = False

    def __init__(self, members: int, bootstrap: bool = True, reward: str = "mean", lam: float = 1.0):
        self.members, self.bootstrap, self.reward, self.lam = members, bootstrap, reward, lam

    @staticmethod
    def outputs_for(data: DataConfig, loss: LossConfig) -> int | None:
        return loss.ensemble or None

    @classmethod
    def for_run(cls, data: DataConfig, loss: LossConfig, dataset: Dataset) -> Ensemble | None:
        if not loss.ensemble:
            return None
        if data.attributes or dataset.stepwise or loss.length_head:
            raise ConfigError(
                "loss.ensemble: trains on ranked rows, not with data.attributes, stepwise rows or loss.length_head"
            )
        return cls(loss.ensemble, loss.ensemble_bootstrap, loss.ensemble_reward, loss.ensemble_lambda)

    @classmethod
    def for_model(cls, config, stepwise_rows: bool) -> Ensemble | None:
        raw = getattr(config, CONFIG_KEY, None)
        if not raw:
            return None
        if stepwise_rows:
            raise DataError("an ensemble reward model scores ranked or plain rows, not stepwise rows")
        return cls(raw["members"], raw["bootstrap"], raw["reward"], raw["lambda"])

    @property
    def outputs(self) -> int:
        return self.members

    @property
    def adapters(self) -> tuple[str, ...]:
        return member_names(self.members)

    def record(self, config) -> None:
        raw = {"members": self.members, "bootstrap": self.bootstrap, "reward": self.reward, "lambda": self.lam}
        setattr(config, CONFIG_KEY, raw)

    def reward_model(self, classifier: nn.Module, attn: str, split: SequenceSplit | None = None) -> nn.Module:
        if split is not None:  # Config refuses it first; a kind built another way is refused here
            raise ConfigError("loss.ensemble: not with train.sequence_parallel > 1 (members are not split yet)")
        if isinstance(classifier, Members):
            return MemberEnsemble(classifier, attn)
        return AdapterEnsemble(classifier, attn, self.members)

    def aggregates(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Over the members (the last dimension): mean, std (ddof 0), min and the conservative mean - λ·std."""
        mean, std = values.mean(-1), values.std(-1, correction=0)
        return {"mean": mean, "std": std, "min": values.min(-1).values, "conservative": mean - self.lam * std}

    def rewards(self, values: torch.Tensor) -> torch.Tensor:
        return self.aggregates(values)[self.reward]

    # training ----------------------------------------------------------------------------------------------------

    def _boot(self, group_id: torch.Tensor) -> torch.Tensor:
        if self.bootstrap:
            return bootstrap_weights(group_id, self.members)
        return torch.ones(self.members, len(group_id), dtype=torch.float64, device=group_id.device)

    def share(self, group: Group, cfg: LossConfig) -> Normaliser:
        """The members' bootstrapped ranking denominators (Σ w·b, then Σ w·b·units, (2M,)) and the prompt (1)."""
        plain = super().share(group, cfg)
        boot = self._boot(torch.tensor([prompt_id(group.source)]))[:, 0].numpy()
        return replace(plain, term=np.concatenate([boot * plain.weight_sum, boot * plain.unit_sum, [1.0]]))

    def loss(self, values: torch.Tensor, labels: SegmentLabels, cfg: LossConfig, norm: Normaliser | None):
        """Σ_m member m's loss; the statistics of the aggregated reward; the (2M + 2,) float64 sums train_metrics
        logs: each member's loss and correct pairs, the pairs, and the update's share of these prompts."""
        n, m = len(labels.seg_group), self.members
        values = values[:n].double() if values.dtype == torch.float64 else values[:n].float()
        aggregate, stats = ranking_loss(self.rewards(values), labels, cfg, *Normaliser.ranking_sums(norm))
        if labels.num_groups == 0:  # placeholder micro-batch (see ranking_loss)
            return aggregate, stats, self.new_sums(values.device)
        denominators = None if norm is None else norm.term[: 2 * m].reshape(2, m)
        losses, correct = member_losses(values, labels, cfg, self._boot(labels.group_id), denominators)
        share = 1.0 if norm is None else labels.num_groups / float(norm.term[-1])
        tail = torch.stack([stats.pairs, torch.tensor(share, dtype=torch.float64, device=values.device)])
        return losses.sum(), stats, torch.cat([losses.detach().double(), correct.double(), tail])

    def new_sums(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(2 * self.members + 2, dtype=torch.float64, device=device)

    def train_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        m = self.members
        losses, correct, pairs, updates = sums[:m], sums[m : 2 * m], float(sums[-2]), float(sums[-1])
        out = {"members_loss": float(losses.sum()) / max(updates, 1e-12)}
        if pairs:
            out.update({f"member_{i}_accuracy": float(c) / pairs for i, c in enumerate(correct)})
        return out

    # evaluation --------------------------------------------------------------------------------------------------

    def eval_part(self, values: torch.Tensor, labels: SegmentLabels):
        if not labels.num_groups:
            return None
        n = len(labels.seg_group)
        return metrics.pair_margins(values[:n].cpu(), labels.seg_group.cpu(), labels.seg_rank.cpu(), labels.num_groups)

    def eval_metrics(self, parts: list) -> dict[str, float]:
        parts = [p for p in parts if p is not None]
        return metrics.report(torch.cat(parts)) if parts else {}

    # export and scoring ------------------------------------------------------------------------------------------

    def member_states(self, state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Each member's trained weights as a one-adapter LoRA run's (adapter ADAPTER, a 1-row head)."""
        out = []
        for m, name in enumerate(self.adapters):
            mine = re.compile(rf"\.{name}(\.|$)")
            member = {}
            for key, value in state.items():
                if ".lora_" in key:
                    if mine.search(key):
                        member[mine.sub(rf".{ADAPTER}\1", key)] = value
                elif key.startswith("score."):
                    member[key] = value[m : m + 1]
                else:
                    member[key] = value
            out.append(member)
        return out

    def load_export(self, path: Path, dtype: torch.dtype | str, attn: str, tokenizer) -> nn.Module:
        from transformers import AutoConfig

        classifiers = [
            load_classifier(str(path / MEMBER.format(m)), dtype, attn, tokenizer) for m in range(self.members)
        ]
        return Members(classifiers, AutoConfig.from_pretrained(path))

    def plain_rewards(self, dest: Path, seqs: list[list[int]], device, steps: list | None = None) -> torch.Tensor:
        """(S, M): each member directory scored alone as any transformers user would."""
        rewards = [Scalar().plain_rewards(dest / MEMBER.format(m), seqs, device) for m in range(self.members)]
        return torch.stack(rewards, 1)

    def score_fields(self, values: list | None, step_values: list | None) -> dict:
        """{"ensemble": {mean, std, min, conservative: one per completion}, with the members' rewards}."""
        if values is None:
            return {}
        v = torch.tensor(values, dtype=torch.float64)
        fields = {name: a.tolist() for name, a in self.aggregates(v).items()}
        return {"ensemble": {**fields, "members": v.tolist(), "reward": self.reward, "lambda": self.lam}}
