"""The trainer's evaluation: ranking metrics of a reward model over held-out groups, sharded over ranks, plus its
kind's own (bigrm.kinds: step metrics of a process reward model, per-attribute ones of an attribute head)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bigrm import dist
from bigrm.config import LossConfig
from bigrm.data.packing import PackedBatch, collate, layout_tokens, pack_bins
from bigrm.data.sequences import Group
from bigrm.kinds import RewardKind, Scalar
from bigrm.objectives.ranking import Stats, metrics


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
    kind: RewardKind | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """(metrics, rewards) of held-out groups. Metrics: ranking metrics of the rewards, then the kind's metrics over
    every rank's completions (default kind: scalar). Rewards, on every rank: every completion's reward, (N,) float64
    on the CPU, the completions of groups[0], then groups[1], ... in their order."""
    kind = kind or Scalar()
    total, parts, sums = Stats.zeros(device), [], kind.new_sums(device)
    starts = np.cumsum([0] + [len(g.seqs) for g in groups])  # (G + 1,) first completion of each group
    every = torch.zeros(int(starts[-1]), dtype=torch.float64, device=device)  # (N,) this rank's groups filled in
    for mb in shard(groups, budget, window, dist.data_parallel_world(), dist.data_parallel_rank(), share_prompt):
        batch = collate([groups[i] for i in mb], pad_id, share_prompt=share_prompt).to(device)
        values = model(batch)  # (n + P,) the completions of mb's groups, group after group, then the step ends
        if not dist.counts():  # a sequence-parallel group's other ranks: the same values, counted once
            continue
        _, stats, kind_sums = kind.loss(values, batch.labels, cfg, None)
        total += stats
        if kind_sums is not None:
            sums = kind_sums if sums is None else sums + kind_sums
        parts.append(kind.eval_part(values, batch.labels))
        n = len(batch.labels.seg_group)
        at = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in mb] + [np.zeros(0, dtype=np.int64)])
        every[torch.from_numpy(at).to(device)] = kind.rewards(values)[:n].double()
    summed = [] if sums is None else [sums.flatten()]
    stats, every, *summed = dist.all_sum_each(total.stack(), every, *summed)  # each reward: one rank, zeros elsewhere
    out = metrics(Stats.unstack(stats.cpu()), cfg, kind.loss_terms(summed[0].cpu() if summed else None, cfg))
    out.update(kind.eval_metrics([p for part in dist.gather_objects(parts) for p in part]))
    return out, every.cpu()
