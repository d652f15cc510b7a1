"""Rewards → the segment-indexed reward-model loss and its running statistics.

Every prompt g (completions i, ranks where 0 is best and equal ranks are ties, optional scores s and standardised
targets t, margin m_g, weight w_g) contributes
    ranking   pairwise: Σ over pairs i ranked above j of -log σ(r_i - r_j - m_ij),  m_ij = m_g + scale·(s_i - s_j)
              listmle:  Σ_i [-r_i + log Σ_{j ranked no better than i} exp(r_j)]  (Plackett–Luce; ties share a set)
              — none for scored rows in `regress` mode;
    extras    regress_weight · mean_i (r_i - t_i)²    (scored rows, regress / both)
              tie_coef · mean over tied pairs (r_i - r_j)²
              center_coef · mean over pairs (r_i + r_j)²   (TRL's centering term)
              l2_coef · mean_i r_i²
and the loss is
    per_prompt  Σ_g w_g (ranking_g / units_g + extras_g) / Σ_g w_g
    per_pair    Σ_g w_g ranking_g / Σ_g w_g units_g  +  Σ_g w_g extras_g / Σ_g w_g
where units are the prompt's ranked pairs (listmle: completions with someone to beat). The sums run over a whole
optimizer step: the trainer passes the step's Σ w and Σ w·units (`denominators`). With K = 2, no weights and no
extras this is exactly TRL's RewardTrainer loss; for K > 2 per_prompt is InstructGPT's 1/C(K,2). All of it is
computed on a dense (G, K, K) grid built by scatter: no Python loop over pairs or prompts.

Unranked prompts (stepwise solutions, rank -1 and weight 0 in packing.SegmentLabels) have no ranking or extra term:
their steps are trained by bigrm.objectives.steps, which the steps kind (bigrm.kinds.steps) adds with weight
loss.step_coef.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from bigrm.config import LossConfig
from bigrm.data.packing import SegmentLabels
from bigrm.data.sequences import Group


@dataclass
class PairGrid:
    diff: torch.Tensor  # (G, K, K) r_i - r_j for slots i, j of each prompt
    valid: torch.Tensor  # (G, K, K) slot i ranked strictly better than slot j
    tied: torch.Tensor  # (G, K, K) slots i < j with equal rank
    rewards: torch.Tensor  # (G, K) 0 where the slot is empty
    filled: torch.Tensor  # (G, K) the slot holds a completion
    rank: torch.Tensor  # (G, K) -1 where empty
    score: torch.Tensor  # (G, K) NaN where empty or unscored
    target: torch.Tensor  # (G, K) NaN where empty or unscored

    @property
    def pairs_per_group(self) -> torch.Tensor:  # (G,)
        return self.valid.sum((1, 2))


def pair_grid(
    rewards: torch.Tensor,
    seg_group: torch.Tensor,
    seg_rank: torch.Tensor,
    num_groups: int,
    seg_score: torch.Tensor | None = None,
    seg_target: torch.Tensor | None = None,
) -> PairGrid:
    """Scatter (N,) segment values into (G, K_max) grids; segments come grouped, groups in order 0..G-1."""
    n, device = rewards.shape[0], rewards.device
    counts = torch.bincount(seg_group, minlength=num_groups)  # (G,)
    first = torch.cumsum(counts, 0) - counts  # (G,) index of each group's first segment
    slot = torch.arange(n, device=device) - first[seg_group]  # (N,) position within its group
    k_max = int(counts.max()) if n else 0

    def scatter(values: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.full((num_groups, k_max), fill, dtype=values.dtype, device=device).index_put(
            (seg_group, slot), values
        )

    nan = torch.full((n,), float("nan"), device=device)
    grid = scatter(rewards, 0.0)
    rank = scatter(seg_rank, -1)
    filled = rank >= 0
    both = filled[:, :, None] & filled[:, None, :]
    upper = torch.ones(k_max, k_max, dtype=torch.bool, device=device).triu(1)
    return PairGrid(
        diff=grid[:, :, None] - grid[:, None, :],
        valid=both & (rank[:, :, None] < rank[:, None, :]),
        tied=both & (rank[:, :, None] == rank[:, None, :]) & upper,
        rewards=grid,
        filled=filled,
        rank=rank,
        score=scatter((nan if seg_score is None else seg_score).to(rewards.dtype), float("nan")),
        target=scatter((nan if seg_target is None else seg_target).to(rewards.dtype), float("nan")),
    )


@dataclass
class Terms:
    ranking: torch.Tensor  # (G,) summed over the prompt's units
    units: torch.Tensor  # (G,) pairs (listmle: completions) the ranking sums over
    extras: torch.Tensor  # (G,) regression, tie, centering and L2 terms, each already a mean within the prompt


def _mean(values: torch.Tensor, mask: torch.Tensor, dims) -> torch.Tensor:
    return torch.where(mask, values, 0.0).sum(dims) / mask.sum(dims).clamp(min=1)


def terms(grid: PairGrid, group_margin: torch.Tensor, cfg: LossConfig) -> Terms:
    scored = (grid.filled & ~torch.isnan(grid.target)).any(1)  # (G,)
    ranked = ~scored | (cfg.scores != "regress")  # (G,) prompts with a ranking term
    if cfg.objective == "pairwise":
        margin = group_margin[:, None, None].expand_as(grid.diff)
        if cfg.score_margin_scale:
            gap = (grid.score[:, :, None] - grid.score[:, None, :]).nan_to_num(0.0)
            margin = margin + cfg.score_margin_scale * gap
        unit_mask = grid.valid
        ranking = torch.where(unit_mask, F.softplus(-(grid.diff - margin)), 0.0).sum((1, 2))  # -log σ(x) = softplus(-x)
        units = unit_mask.sum((1, 2))
    else:
        # risk[g, i, j]: j is ranked no better than i, so j competes with i for i's place
        risk = grid.filled[:, None, :] & (grid.rank[:, None, :] >= grid.rank[:, :, None])
        log_z = torch.logsumexp(grid.rewards[:, None, :].expand_as(risk).masked_fill(~risk, float("-inf")), -1)
        unit_mask = grid.filled & (risk.sum(-1) > 1)  # (G, K) a completion with someone to beat
        ranking = torch.where(unit_mask, log_z - grid.rewards, 0.0).sum(1)
        units = unit_mask.sum(1)
    ranking, units = ranking * ranked, units * ranked

    extras = torch.zeros_like(ranking)
    if cfg.scores != "rank":
        sq_err = (grid.rewards - grid.target.nan_to_num(0.0)).square()
        extras = extras + cfg.regress_weight * _mean(sq_err, grid.filled, 1) * scored
    if cfg.tie_coef:
        extras = extras + cfg.tie_coef * _mean(grid.diff.square(), grid.tied, (1, 2))
    if cfg.center_rewards_coef:
        pair_sum = grid.rewards[:, :, None] + grid.rewards[:, None, :]
        every_pair = grid.filled[:, :, None] & grid.filled[:, None, :] & torch.ones_like(grid.tied).triu(1)
        extras = extras + cfg.center_rewards_coef * _mean(pair_sum.square(), every_pair, (1, 2))
    if cfg.l2_rewards_coef:
        extras = extras + cfg.l2_rewards_coef * _mean(grid.rewards.square(), grid.filled, 1)
    return Terms(ranking, units.to(ranking.dtype), extras)


def group_units(group: Group, cfg: LossConfig) -> int:
    """The units Terms counts for this prompt, from its labels alone (so a step's denominators are known early)."""
    if group.labels.targets is not None and cfg.scores == "regress":
        return 0
    ranks = np.asarray(group.labels.ranks or range(len(group.seqs)))
    if cfg.objective == "pairwise":
        return int((ranks[:, None] < ranks[None, :]).sum())
    return int(((ranks[None, :] >= ranks[:, None]).sum(1) > 1).sum())


def denominators(groups: list[Group], cfg: LossConfig) -> tuple[float, float]:
    """(Σ w, Σ w·units) over the ranked prompts of an optimizer step (for steps: step_loss.step_denominator)."""
    ranked = [g for g in groups if g.labels.ranked]
    return sum(g.labels.weight for g in ranked), sum(g.labels.weight * group_units(g, cfg) for g in ranked)


def combine(t: Terms, weight: torch.Tensor, cfg: LossConfig, weight_sum: float, unit_sum: float) -> torch.Tensor:
    weight_sum = max(weight_sum, 1e-12)  # only unranked prompts: every term is 0
    extras = (weight * t.extras).sum() / weight_sum
    if cfg.pair_weighting == "per_prompt":
        return (weight * t.ranking / t.units.clamp(min=1)).sum() / weight_sum + extras
    return (weight * t.ranking).sum() / max(unit_sum, 1e-12) + extras


@dataclass
class Stats:
    """Additive float64 sums over a set of prompts, from which `metrics` computes the logged numbers; they add over
    micro-batches and (stacked into one tensor) over ranks."""

    prompt_num: torch.Tensor  # Σ w·ranking/units: the per_prompt loss numerator
    ranking_num: torch.Tensor  # Σ w·ranking: the per_pair loss numerator
    unit_num: torch.Tensor  # Σ w·units: the per_pair denominator
    extras_num: torch.Tensor  # Σ w·extras
    weight_sum: torch.Tensor  # Σ w
    groups: torch.Tensor  # prompts
    pairs: torch.Tensor  # ranked pairs (i above j)
    correct_pairs: torch.Tensor  # ranked pairs with r_i > r_j
    tau_sum: torch.Tensor  # Σ over prompts of Kendall's tau over its ranked pairs
    tau_groups: torch.Tensor  # prompts with at least one ranked pair
    tie_pairs: torch.Tensor  # tied pairs
    ties_close: torch.Tensor  # tied pairs with |r_i - r_j| < tie_threshold
    reward_sum: torch.Tensor  # Σ r
    reward_sq_sum: torch.Tensor  # Σ r²
    rewards: torch.Tensor  # completions rewarded
    # stepwise prompts (bigrm.objectives.steps)
    step_loss_num: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))  # Σ w·BCE
    step_weight_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))  # Σ w
    steps: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    correct_steps: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

    @classmethod
    def zeros(cls, device: torch.device | str = "cpu") -> Stats:
        return cls.unstack(torch.zeros(len(fields(cls)), dtype=torch.float64, device=device))

    def stack(self) -> torch.Tensor:
        """(F,) float64, one value per field in field order: what ranks sum in one all_reduce."""
        return torch.stack([getattr(self, f.name) for f in fields(self)])

    @classmethod
    def unstack(cls, values: torch.Tensor) -> Stats:
        return cls(*values.unbind())

    def float64(self, device: torch.device) -> Stats:
        return Stats(*(getattr(self, f.name).detach().double().to(device) for f in fields(self)))

    def values(self) -> dict[str, float]:
        return dict(zip((f.name for f in fields(self)), self.stack().tolist(), strict=True))

    def __add__(self, other: Stats) -> Stats:
        return Stats.unstack(self.stack() + other.stack())

    def __radd__(self, other: int) -> Stats:  # sum() starts from 0
        return self if other == 0 else NotImplemented


def ranking_loss(
    rewards: torch.Tensor,
    labels: SegmentLabels,
    cfg: LossConfig,
    weight_sum: float | None = None,
    unit_sum: float | None = None,
) -> tuple[torch.Tensor, Stats]:
    """(loss, stats): the loss of this micro-batch's prompts with the step's denominators (default: this
    micro-batch's own), and the statistics that `metrics` turns into numbers."""
    if labels.num_groups == 0:  # placeholder micro-batch: keep the graph (ZeRO-3 needs every rank to backward)
        return rewards.sum() * 0.0, Stats.zeros(rewards.device)
    r = rewards.double() if rewards.dtype == torch.float64 else rewards.float()  # never below fp32
    grid = pair_grid(r, labels.seg_group, labels.seg_rank, labels.num_groups, labels.seg_score, labels.seg_target)
    t = terms(grid, labels.group_margin.to(r.dtype), cfg)
    w = labels.group_weight.to(r.dtype)
    if weight_sum is None:
        weight_sum, unit_sum = float(w.sum()), float((w * t.units).sum())
    loss = combine(t, w, cfg, weight_sum, unit_sum)
    with torch.no_grad():
        d = grid.diff.detach()
        concordant = (grid.valid & (d > 0)).sum((1, 2)).double()
        discordant = (grid.valid & (d < 0)).sum((1, 2)).double()
        pairs = grid.pairs_per_group.double()
        rd = r.detach().double()[labels.seg_rank >= 0]  # ranked completions
        stats = Stats(
            prompt_num=(w * t.ranking / t.units.clamp(min=1)).sum(),
            ranking_num=(w * t.ranking).sum(),
            unit_num=(w * t.units).sum(),
            extras_num=(w * t.extras).sum(),
            weight_sum=w.sum(),
            groups=(labels.group_weight > 0).sum(),
            pairs=pairs.sum(),
            correct_pairs=concordant.sum(),
            tau_sum=((concordant - discordant) / pairs.clamp(min=1)).sum(),
            tau_groups=(pairs > 0).sum(),
            tie_pairs=grid.tied.sum(),
            ties_close=(grid.tied & (d.abs() < cfg.tie_threshold)).sum(),
            reward_sum=rd.sum(),
            reward_sq_sum=rd.square().sum(),
            rewards=torch.tensor(len(rd)),
        )
        stats = stats.float64(rewards.device)
    return loss, stats


def metrics(stats: Stats, cfg: LossConfig, terms: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """The logged figures of a set of prompts. `loss` is what training minimises: the ranking loss (over prompts
    with a pair or an extra term), plus step_coef times the step loss (with steps), plus coef times each of `terms`
    ({name: (value, coef)}: a kind's own, e.g. an attribute head's rating loss); each is also logged alone when
    there are several. Figures that do not apply are absent: pair figures without a ranked pair, step ones without a
    step."""
    v = stats.values()
    out, parts, ranking = {}, [], None
    if v["pairs"]:
        out["pairwise_accuracy"] = v["correct_pairs"] / v["pairs"]
    if v["groups"] and (v["pairs"] or v["extras_num"]):
        weights = max(v["weight_sum"], 1e-12)
        if cfg.pair_weighting == "per_prompt":
            ranking = (v["prompt_num"] + v["extras_num"]) / weights
        else:
            ranking = v["ranking_num"] / max(v["unit_num"], 1e-12) + v["extras_num"] / weights
        parts.append(ranking)
    if v["tau_groups"]:
        out["kendall_tau"] = v["tau_sum"] / v["tau_groups"]
    if v["groups"] or not v["steps"]:  # stepwise prompts alone: counted by num_steps
        out["num_prompts"] = int(v["groups"])
    if v["pairs"]:
        out["num_pairs"] = int(v["pairs"])
    if v["rewards"]:
        n = v["rewards"]
        out["reward_mean"] = v["reward_sum"] / n
        out["reward_std"] = max(v["reward_sq_sum"] / n - (v["reward_sum"] / n) ** 2, 0.0) ** 0.5
    if v["tie_pairs"]:
        out["tie_accuracy"] = v["ties_close"] / v["tie_pairs"]
        out["num_tie_pairs"] = int(v["tie_pairs"])
    if v["steps"]:
        step = v["step_loss_num"] / max(v["step_weight_sum"], 1e-12)
        parts.append(cfg.step_coef * step)
        out.update(step_loss=step, step_accuracy=v["correct_steps"] / v["steps"], num_steps=int(v["steps"]))
    for name, (value, coef) in (terms or {}).items():
        parts.append(coef * value)
        out[name] = value
    if parts:
        out["loss"] = sum(parts[1:], parts[0])
    if ranking is not None and len(parts) > 1:  # alone, the ranking term is `loss`
        out["ranking_loss"] = ranking
    return out
