"""Ranking metrics of a reward model over held-out groups, sharded over ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bigrm import dist
from bigrm.config import LossConfig
from bigrm.loss import Stats, metrics, ranking_loss
from bigrm.packing import PackedBatch, collate, layout_tokens, pack_bins
from bigrm.sequences import Group


def shard(
    groups: list[Group], budget: int, window: int, world: int, rank: int, share_prompt: bool = False
) -> list[list[int]]:
    """This rank's micro-batches; every rank gets the same count (ZeRO-3 gathers weights in every forward)."""
    sizes = [layout_tokens(g, share_prompt) for g in groups]
    bins = pack_bins(list(range(len(groups))), sizes, budget, window)
    bins += [[] for _ in range(-len(bins) % world)]
    return bins[rank::world]


@torch.no_grad()
def evaluate(
    model: Callable[[PackedBatch], torch.Tensor],
    groups: list[Group],
    *,
    budget: int,
    window: int,
    pad_id: int,
    device: torch.device,
    cfg: LossConfig,
    share_prompt: bool = False,
) -> dict[str, float]:
    total = Stats.zeros(device)
    for mb in shard(groups, budget, window, dist.world(), dist.rank(), share_prompt):
        batch = collate([groups[i] for i in mb], pad_id, share_prompt=share_prompt).to(device)
        rewards = model(batch)
        _, stats = ranking_loss(rewards, batch.labels, cfg)
        total += stats
    return metrics(Stats.unstack(dist.all_sum(total.stack()).cpu()), cfg)
