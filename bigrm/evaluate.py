"""Ranking metrics of a reward model over held-out groups, sharded over ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bigrm import attributes, dist
from bigrm.attributes import AttributeHead
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
    head: AttributeHead | None = None,
) -> dict[str, float]:
    """Ranking metrics of the rewards (attribute heads: of the scalar reward) and, with `head`, per-attribute
    metrics (bigrm.attributes.report) over every rank's completions."""
    total = Stats.zeros(device)
    values, ratings = [], []  # attribute heads: (N, A) outputs and ratings of this rank's micro-batches
    for mb in shard(groups, budget, window, dist.world(), dist.rank(), share_prompt):
        batch = collate([groups[i] for i in mb], pad_id, share_prompt=share_prompt).to(device)
        rewards = model(batch)
        if head is not None:
            if batch.labels.num_groups:
                values.append(rewards.cpu())
                ratings.append(batch.labels.seg_attributes.cpu())
            rewards = head.scalar(rewards)
        _, stats = ranking_loss(rewards, batch.labels, cfg)
        total += stats
    out = metrics(Stats.unstack(dist.all_sum(total.stack()).cpu()), cfg)
    if head is not None:  # rank correlations need every completion: gathered, not summed
        width = len(head.names)
        everyone = [p for rank in dist.gather_objects((values, ratings)) for p in zip(*rank, strict=True)]
        v = torch.cat([p[0] for p in everyone]) if everyone else torch.zeros(0, width)
        r = torch.cat([p[1].double() for p in everyone]) if everyone else torch.zeros(0, width)
        out.update(attributes.report(v, r, head))
    return out
