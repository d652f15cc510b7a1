"""Ranking (and, for stepwise prompts, step) metrics of a reward model over held-out groups, sharded over ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bigrm import dist
from bigrm.config import LossConfig
from bigrm.loss import Stats, metrics, total_loss
from bigrm.packing import PackedBatch, collate, layout_tokens, pack_bins
from bigrm.sequences import Group
from bigrm.step_loss import step_report


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
    total, steps = Stats.zeros(device), []
    for mb in shard(groups, budget, window, dist.world(), dist.rank(), share_prompt):
        batch = collate([groups[i] for i in mb], pad_id, share_prompt=share_prompt).to(device)
        values = model(batch)
        _, stats = total_loss(values, batch.labels, cfg)
        total += stats
        lab = batch.labels
        if lab.num_steps:
            steps.append((values[len(lab.seg_group) :].cpu(), lab.step_label.cpu(), lab.step_seg.cpu()))
    out = metrics(Stats.unstack(dist.all_sum(total.stack()).cpu()), cfg)
    every = [s for part in dist.gather_objects(steps) for s in part]  # AUROC and first errors need every step
    if every:
        offsets = [0]  # solutions numbered across micro-batches
        for _, _, seg in every:
            offsets.append(offsets[-1] + int(seg.max()) + 1)
        out.update(
            step_report(
                torch.cat([v for v, _, _ in every]),
                torch.cat([y for _, y, _ in every]),
                torch.cat([seg + o for (_, _, seg), o in zip(every, offsets, strict=False)]),
            )
        )
    return out
