"""An eval drawn (`bigrm eval --report DIR`, and the trainer's <output_dir>/eval_report): PNG plots made with
matplotlib, a one-page report.md that embeds them and lists the metrics, and report.json with the numbers each plot
was drawn from.

  reliability.png      calibration of p = σ(r_i − r_j): per confidence bin (bigrm.evaluation.diagnostics' ece_bins) the
                       observed accuracy (bars), and as points at the bin's mean confidence, with the pairs per bin
  reward_hist.png      rewards of the best-ranked completions against the worst-ranked ones (chosen against
                       rejected when every prompt has two), over the prompts whose completions are not all tied
  reward_length.png    reward against completion length (tokens from the completion's first, after any cut of the
                       prompt), titled with the Spearman ρ of the metrics; a note instead when all lengths are equal
  accuracy.png         pairwise accuracy by K and by subset (a row's `subset`, else its source file)
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bigrm.config import LossConfig
from bigrm.data.packing import SegmentLabels, completion_lengths
from bigrm.data.sequences import Group
from bigrm.errors import ConfigError
from bigrm.evaluation.diagnostics import accuracy_by_name, ranking_report

HISTOGRAM_BINS = 30


def check_installed(what: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(f"{what}: the plots need matplotlib (pip install 'bigrm[report]' or pip install matplotlib)")


def source_file(source: str) -> str:
    """The file name in a row's source ("path:line N" / "path:row N", see bigrm.data.rows.Locator)."""
    return Path(source.rsplit(":", 1)[0]).name


def write(
    directory: Path,
    metrics: dict,
    rewards: torch.Tensor,
    labels: SegmentLabels,
    lengths: torch.Tensor,
    names: list[str],
) -> dict:
    """The plots, report.md and report.json in `directory`; returns what report.json holds.

    metrics: bigrm.evaluation.diagnostics.ranking_report of the same rewards; rewards and lengths (N,) one per
    completion in the order of `labels` (completions of a prompt contiguous, prompts in order); names one per prompt."""
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever display the machine has
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    r = rewards.detach().double().cpu().numpy()  # (N,)
    group, rank = labels.seg_group.cpu().numpy(), labels.seg_rank.cpu().numpy()  # (N,) each
    accuracy, prompts = accuracy_by_name(rewards.cpu(), labels.to("cpu"), names)
    drawn = {
        "reliability": _reliability(plt, directory / "reliability.png", metrics),
        "reward_histogram": _histogram(plt, directory / "reward_hist.png", r, group, rank, labels.num_groups),
        "reward_length": _length(plt, directory / "reward_length.png", r, lengths.cpu().numpy(), metrics),
        "accuracy": _accuracy(
            plt, directory / "accuracy.png", metrics["accuracy_by_k"], _prompts_by_k(group), accuracy, prompts
        ),
    }
    (directory / "report.json").write_text(json.dumps(drawn, indent=2) + "\n")
    (directory / "report.md").write_text(_markdown(metrics, drawn))
    return drawn


def write_for_groups(directory: Path, groups: Sequence[Group], rewards: torch.Tensor, cfg: LossConfig) -> str:
    """The trainer's final eval drawn, when matplotlib is installed; returns the console line saying where (or why
    not). Completion length: the tokens from the completion's first (packing.completion_lengths, as `bigrm eval`);
    subsets: source files.
    Stepwise groups are left out: they hold no ranking (their step metrics are in metrics.json)."""
    if importlib.util.find_spec("matplotlib") is None:
        return f"eval report: not drawn ({directory} needs matplotlib: pip install 'bigrm[report]')"
    starts = np.cumsum([0] + [len(g.seqs) for g in groups])
    ranked = [i for i, g in enumerate(groups) if g.labels.ranked]
    if not ranked:
        return "eval report: not drawn (the eval data is stepwise only: no ranking to draw)"
    if len(ranked) < len(groups):
        rewards = torch.cat([rewards[starts[i] : starts[i + 1]] for i in ranked])
        groups = [groups[i] for i in ranked]
    labels = SegmentLabels.of([g.labels for g in groups], [len(g.seqs) for g in groups], torch.float64)
    lengths = torch.tensor(completion_lengths(groups))  # (N,)
    metrics = ranking_report(rewards, labels, lengths, cfg)
    write(directory, metrics, rewards, labels, lengths, [source_file(g.source) for g in groups])
    return f"eval report: {directory / 'report.md'}"


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _reliability(plt, path: Path, metrics: dict) -> dict:
    bins = metrics["ece_bins"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0.5, 1.0], [0.5, 1.0], "k--", lw=1, label="perfect calibration")
    width = [b["upper"] - b["lower"] for b in bins]
    top.bar([b["lower"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge", alpha=0.6,
            edgecolor="C0", label="observed accuracy of the bin")  # fmt: skip
    # each point sits at its bin's mean confidence: on the diagonal when the bin is calibrated
    top.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="C1",
             label="observed accuracy at the bin's mean confidence")  # fmt: skip
    ece = metrics["ece"]
    top.set(ylabel="fraction ranked right", ylim=(0, 1.02), title=f"Reliability (ECE {_num(ece)})")
    top.legend(loc="upper left")
    bottom.bar([b["lower"] for b in bins], [b["count"] for b in bins], width=width, align="edge", color="C2")
    for b in bins:
        bottom.annotate(str(b["count"]), ((b["lower"] + b["upper"]) / 2, b["count"]), ha="center", va="bottom")
    bottom.set(xlabel="confidence max(p, 1-p), p = σ(r_i - r_j)", ylabel="pairs", xlim=(0.5, 1.0))
    return {"file": _save(plt, fig, path), "ece": ece, "bins": bins}


def _histogram(plt, path: Path, r: np.ndarray, group: np.ndarray, rank: np.ndarray, num_groups: int) -> dict:
    worst_rank = np.full(num_groups, -1)
    np.maximum.at(worst_rank, group, rank)  # (G,) the largest rank of each prompt
    ranked = worst_rank[group] > 0  # (N,) the completion's prompt is not all tied
    best, worst = r[ranked & (rank == 0)], r[ranked & (rank == worst_rank[group])]
    pairs = bool(np.all(np.bincount(group, minlength=num_groups) == 2))
    names = ("chosen", "rejected") if pairs else ("best", "worst")
    edges = np.histogram_bin_edges(np.concatenate([best, worst]), bins=HISTOGRAM_BINS)
    counts = [np.histogram(x, bins=edges)[0].tolist() for x in (best, worst)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for x, name, color in zip((best, worst), names, ("C2", "C3"), strict=True):
        ax.hist(x, bins=edges, alpha=0.55, color=color, label=f"{name} (n={len(x)}, mean {x.mean():.3g})")
    ax.set(xlabel="reward", ylabel="completions", title=f"Rewards of the {names[0]} and {names[1]} completions")
    ax.legend()
    return {"file": _save(plt, fig, path), "series": list(names), "edges": edges.tolist(), "counts": counts}


def _length(plt, path: Path, r: np.ndarray, lengths: np.ndarray, metrics: dict) -> dict:
    rho = metrics["length_correlation"]
    fig, ax = plt.subplots(figsize=(6, 4))
    same = len(lengths) > 0 and bool((lengths == lengths[0]).all())
    if same:  # a scatter would be one vertical line, and ρ is undefined
        note = f"every completion is {int(lengths[0])} tokens long: no relation between reward and length to show"
        ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
    else:
        ax.scatter(lengths, r, s=6, alpha=0.4)
        ax.set(xlabel="completion length (tokens)", ylabel="reward")
    ax.set_title(f"Reward vs length: Spearman ρ = {_num(rho)}")
    drawn = {"file": _save(plt, fig, path), "spearman_rho": rho, "points": len(r)}
    return drawn | ({"note": note} if same else {})


def _prompts_by_k(group: np.ndarray) -> dict[str, int]:
    ks = np.bincount(group)  # (G,) completions of each prompt
    return {str(k): int((ks == k).sum()) for k in np.unique(ks)}


def _accuracy(plt, path: Path, by_k: dict, prompts_k: dict, by_name: dict, prompts: dict) -> dict:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, max(3.5, 0.35 * max(len(by_k), len(by_name)) + 1.5)))
    panels = ((left, by_k, prompts_k, "by K (completions per prompt)"), (right, by_name, prompts, "by subset"))
    for ax, values, counts, title in panels:
        keys = list(values)
        heights = [np.nan if values[k] is None else values[k] for k in keys]  # None: only tied ranks
        ax.barh(range(len(keys)), heights, height=0.6, color="C0")
        ax.set_yticks(range(len(keys)), [f"K={k}" if values is by_k else k for k in keys])
        for y, k in enumerate(keys):
            text = f"{_num(values[k])}  ({counts[k]} prompts)"
            ax.annotate(text, (0.02, y), va="center", color="white" if (values[k] or 0) > 0.5 else "black")
        ax.axvline(0.5, color="k", ls="--", lw=1)
        ax.set(xlim=(0, 1), xlabel="pairwise accuracy", title=title)
        ax.invert_yaxis()
    drawn = {"by_k": by_k, "prompts_by_k": prompts_k, "by_subset": by_name, "prompts_by_subset": prompts}
    return {"file": _save(plt, fig, path), **drawn}


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _markdown(metrics: dict, drawn: dict) -> str:
    scalars = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    rows = "".join(f"| {k} | {v:.4g} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in scalars)
    sections = "".join(f"| {k} | {v:.4f} |\n" for k, v in metrics.get("rewardbench", {}).items())
    figures = {
        "reliability": "Calibration: observed accuracy per confidence bin (bars), pairs per bin below.",
        "reward_histogram": "Rewards of the best- and worst-ranked completions of each prompt.",
        "reward_length": "Reward against completion length; a large |ρ| is a length bias.",
        "accuracy": "Pairwise accuracy by completions per prompt and by subset (0.5: chance).",
    }
    return (
        "# Reward model evaluation\n\n| metric | value |\n|---|---|\n"
        + rows
        + (f"\n## RewardBench\n\n| section | accuracy |\n|---|---|\n{sections}" if sections else "")
        + "".join(
            f"\n## {key.replace('_', ' ')}\n\n{text}\n\n![{key}]({drawn[key]['file']})\n"
            for key, text in figures.items()
        )
    )
