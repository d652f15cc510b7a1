"""Ranking (and, for stepwise prompts, step) metrics of a reward model over held-out groups, sharded over ranks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bigrm import dist
from bigrm.config import LossConfig
from bigrm.data.packing import PackedBatch, collate, layout_tokens, pack_bins
from bigrm.data.sequences import Group
from bigrm.evaluation.ratings import report as rating_report
from bigrm.evaluation.steps import step_report
from bigrm.model.heads import AttributeHead
from bigrm.objectives.ranking import Stats, metrics
from bigrm.objectives.total import total_loss


def shard(
    groups: list[Group], budget: int, window: int, world: int, rank: int, share_prompt: bool = False
) -> list[list[int]]:
    """This rank's micro-batches; every rank gets the same count (ZeRO-3 gathers weights in every forward)."""
    sizes = [layout_tokens(g, share_prompt) for g in groups]
    bins = pack_bins(list(range(len(groups))), sizes, budget, window)
    bins += [[] for _ in range(-len(bins) % world)]
    return bins[rank::world]


@torch.no_grad()
def evaluate_rewards(
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
) -> tuple[dict[str, float], torch.Tensor]:
    """(metrics, rewards) of held-out groups. Metrics: ranking metrics of the rewards (attribute heads: of the scalar
    reward), step metrics of stepwise prompts, with `head` per-attribute metrics (bigrm.model.heads.report) over every
    rank's completions. Rewards, on every rank: every completion's reward (the scalar), (N,) float64 on the CPU, the
    completions of groups[0], then groups[1], ... in their order."""
    total, steps = Stats.zeros(device), []
    values_a, ratings = [], []  # attribute heads: (N, A) outputs and ratings of this rank's micro-batches
    starts = np.cumsum([0] + [len(g.seqs) for g in groups])  # (G + 1,) first completion of each group
    every = torch.zeros(int(starts[-1]), dtype=torch.float64, device=device)  # (N,) this rank's groups filled in
    for mb in shard(groups, budget, window, dist.world(), dist.rank(), share_prompt):
        batch = collate([groups[i] for i in mb], pad_id, share_prompt=share_prompt).to(device)
        values = model(batch)  # (n + P,) the completions of mb's groups, group after group, then the step ends
        _, stats, _ = total_loss(values, batch.labels, cfg, head=head)
        total += stats
        lab = batch.labels
        n = len(lab.seg_group)
        if head is not None:  # (n, A) outputs
            if lab.num_groups:
                values_a.append(values.cpu())
                ratings.append(lab.seg_attributes.cpu())
            values = head.scalar(values)
        at = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in mb] + [np.zeros(0, dtype=np.int64)])
        every[torch.from_numpy(at).to(device)] = values[:n].double()
        if lab.num_steps:
            steps.append((values[n:].cpu(), lab.step_label.cpu(), lab.step_seg.cpu()))
    stats, every = dist.all_sum_each(total.stack(), every)  # each reward comes from one rank, zeros elsewhere
    out = metrics(Stats.unstack(stats.cpu()), cfg)
    gathered = [s for part in dist.gather_objects(steps) for s in part]  # AUROC and first errors need every step
    if gathered:
        offsets = [0]  # solutions numbered across micro-batches
        for _, _, seg in gathered:
            offsets.append(offsets[-1] + int(seg.max()) + 1)
        out.update(
            step_report(
                torch.cat([v for v, _, _ in gathered]),
                torch.cat([y for _, y, _ in gathered]),
                torch.cat([seg + o for (_, _, seg), o in zip(gathered, offsets, strict=False)]),
            )
        )
    if head is not None:  # rank correlations need every completion: gathered, not summed
        width = len(head.names)
        everyone = [p for rank in dist.gather_objects((values_a, ratings)) for p in zip(*rank, strict=True)]
        v = torch.cat([p[0] for p in everyone]) if everyone else torch.zeros(0, width)
        r = torch.cat([p[1].double() for p in everyone]) if everyone else torch.zeros(0, width)
        out.update(rating_report(v, r, head))
    return out, every.cpu()
