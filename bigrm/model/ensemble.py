"""An ensemble's members over one packed batch → (N, M), member m's reward in column m (bigrm.kinds.ensemble).

In training the members are M LoRA adapter sets on one frozen base (peft adapters named MEMBER.format(m)) and the
value head has M rows, row m member m's head: each member runs its own forward over the same packed batch, since
adapters in every layer leave no part of the forward to share. An export is M plain 1-logit classifiers
(`Members`), each forwarded as its own RewardModel.
"""

from __future__ import annotations

import torch
from torch import nn

from bigrm.data.packing import PackedBatch
from bigrm.model.reward_model import RewardModel

MEMBER = "member_{}"


def member_names(members: int) -> tuple[str, ...]:
    return tuple(MEMBER.format(m) for m in range(members))


def activate(classifier: nn.Module, name: str) -> None:
    """Make one adapter set the active one in every adapted layer, leaving which weights train as they are (peft's
    set_adapter would freeze the others)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in classifier.modules():
        if isinstance(module, BaseTunerLayer):
            module._active_adapter = [name]


class AdapterEnsemble(RewardModel):
    """Training (and a checkpoint as trained): one classifier with M adapter sets and an M-row head."""

    def __init__(self, classifier: nn.Module, attn: str, members: int):
        super().__init__(classifier, attn, vector=True)
        self.names = member_names(members)

    def forward(self, batch: PackedBatch, every_token: bool = False) -> torch.Tensor:
        columns = []
        for m, name in enumerate(self.names):
            activate(self.classifier, name)
            columns.append(super().forward(batch, every_token)[:, m])  # the other rows' products are unused
        return torch.stack(columns, 1)


class Members(nn.Module):
    """An exported ensemble as loaded: its M member classifiers and the ensemble's own config (what it records)."""

    def __init__(self, classifiers: list[nn.Module], config):
        super().__init__()
        self.members = nn.ModuleList(classifiers)
        self.config = config


class MemberEnsemble(nn.Module):
    """Scoring an export: each member classifier forwarded as a RewardModel over the same batch."""

    def __init__(self, members: Members, attn: str):
        super().__init__()
        self.classifier = members
        self.models = nn.ModuleList(RewardModel(c, attn) for c in members.members)
        self.needs = self.models[0].needs
        self.attn = attn

    def forward(self, batch: PackedBatch, every_token: bool = False) -> torch.Tensor:
        return torch.stack([model(batch, every_token) for model in self.models], -1)
