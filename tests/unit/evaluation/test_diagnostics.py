"""bigrm.evaluation.diagnostics.ranking_report against slow, obviously-correct Python loops over pairs."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from dataclasses import dataclass

import pytest
import torch

from bigrm.config import LossConfig
from bigrm.data.packing import SegmentLabels
from bigrm.evaluation.diagnostics import ranking_report
from bigrm.objectives.ranking import metrics, ranking_loss

SUBSET_NAMES = ["alpacaeval-easy", "mt-bench-med", "llmbar-natural", "donotanswer", "xstest-should-refuse"]
SUBSET_NAMES += ["xstest-should-respond", "math-prm", "hep-go", "hep-js", "shp", "summarize", "my-own-set"]


@dataclass
class Group:
    rewards: list[float]
    ranks: list[int]  # 0 = best
    lengths: list[int]
    margin: float
    subset: str = "my-own-set"
    weight: float = 1.0


def random_groups(seed: int, n_groups: int = 60) -> list[Group]:
    rng = random.Random(seed)
    groups = []
    for g in range(n_groups):
        k = rng.randint(2, 8)
        rewards = [round(rng.gauss(0, 1.5), 1) for _ in range(k)]  # on a 0.1 grid: reward ties are common
        lengths = [rng.randint(1, 8) for _ in range(k)]  # length ties too
        if g % 20 == 7:  # all ranks tied: a prompt without a single pair
            ranks = [0] * k
        elif rng.random() < 0.15:  # some tied ranks: such completions form no pair
            ranks = [rng.randint(0, k - 2) for _ in range(k)]
        else:
            ranks = rng.sample(range(k), k)  # completions not stored best-first
        margin, weight = rng.choice([0.0, 0.0, 0.5, 1.0]), rng.choice([1.0, 1.0, 0.5, 2.0])
        groups.append(Group(rewards, ranks, lengths, margin, rng.choice(SUBSET_NAMES), weight))
    return groups


def tensors(groups: list[Group], dtype=torch.float64) -> tuple[torch.Tensor, SegmentLabels, torch.Tensor]:
    """(rewards, labels, lengths) as bigrm eval passes them."""
    n = sum(len(g.rewards) for g in groups)
    labels = SegmentLabels(
        seg_group=torch.tensor([i for i, g in enumerate(groups) for _ in g.rewards]),
        seg_rank=torch.tensor([x for g in groups for x in g.ranks]),
        seg_score=torch.full((n,), math.nan, dtype=dtype),
        seg_target=torch.full((n,), math.nan, dtype=dtype),
        group_margin=torch.tensor([g.margin for g in groups], dtype=dtype),
        group_weight=torch.tensor([g.weight for g in groups], dtype=dtype),
        num_groups=len(groups),
    )
    rewards = torch.tensor([x for g in groups for x in g.rewards], dtype=dtype)
    return rewards, labels, torch.tensor([x for g in groups for x in g.lengths])


def report(groups: list[Group], cfg: LossConfig | None = None, **kwargs) -> dict:
    rewards, labels, lengths = tensors(groups)
    return ranking_report(rewards, labels, lengths, cfg or LossConfig(), **kwargs)


def pairs_of(g: Group) -> list[tuple[float, float]]:
    """(r_better, r_worse) for every ordered pair of completions with the first ranked strictly better."""
    ks = range(len(g.rewards))
    return [(g.rewards[i], g.rewards[j]) for i, j in itertools.permutations(ks, 2) if g.ranks[i] < g.ranks[j]]


def slow_accuracy(groups: list[Group]) -> float | None:
    pairs = [p for g in groups for p in pairs_of(g)]
    return sum(a > b for a, b in pairs) / len(pairs) if pairs else None


def slow_spearman(a: list[float], b: list[float]) -> float | None:
    def ranks(x):
        out = []
        for v in x:
            below = sum(1 for w in x if w < v)
            same = sum(1 for w in x if w == v)
            out.append(below + (same + 1) / 2)  # positions below+1 .. below+same, averaged
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    var_a = sum((x - ma) ** 2 for x in ra)
    var_b = sum((y - mb) ** 2 for y in rb)
    if var_a == 0 or var_b == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True)) / math.sqrt(var_a * var_b)


def slow_ece(diffs: list[float], bins: int) -> tuple[float, list[dict]]:
    table = []
    for b in range(bins):
        lower, upper = 0.5 + b / (2 * bins), 0.5 + (b + 1) / (2 * bins)
        inside = []
        for d in diffs:
            p = 1 / (1 + math.exp(-d))
            conf = max(p, 1 - p)
            if lower <= conf < upper or (b == bins - 1 and conf == upper):
                inside.append((p > 0.5, conf))
        if inside:
            acc = sum(c for c, _ in inside) / len(inside)
            conf = sum(c for _, c in inside) / len(inside)
            table.append({"lower": lower, "upper": upper, "count": len(inside), "accuracy": acc, "confidence": conf})
    ece = sum(t["count"] / len(diffs) * abs(t["accuracy"] - t["confidence"]) for t in table)
    return ece, table


def slow_report(groups: list[Group], l2_coef: float, bins: int) -> dict:
    """The report for LossConfig(l2_rewards_coef=l2_coef): per-prompt pairwise loss, weighted by prompt."""
    losses, taus, ties = [], [], []
    for g in groups:
        ps = pairs_of(g)
        pair_loss = sum(math.log1p(math.exp(-(a - b - g.margin))) for a, b in ps)  # -log σ(x) = log(1 + e^-x)
        l2 = l2_coef * sum(x * x for x in g.rewards) / len(g.rewards)
        losses.append((pair_loss / len(ps) if ps else 0.0) + l2)
        if ps:
            taus.append((sum(a > b for a, b in ps) - sum(a < b for a, b in ps)) / len(ps))
        k = len(g.rewards)
        ties += [
            abs(g.rewards[i] - g.rewards[j]) for i, j in itertools.combinations(range(k), 2) if g.ranks[i] == g.ranks[j]
        ]
    flat = [x for g in groups for x in g.rewards]
    diffs = [a - b for g in groups for a, b in pairs_of(g)]
    ece, table = slow_ece(diffs, bins)
    ks = sorted({len(g.rewards) for g in groups})
    want = {
        "pairwise_accuracy": slow_accuracy(groups),
        "num_pairs": len(diffs),
        "num_prompts": len(groups),
        "loss": sum(g.weight * x for g, x in zip(groups, losses, strict=True)) / sum(g.weight for g in groups),
        "kendall_tau": statistics.fmean(taus),
        "accuracy_by_k": {str(k): slow_accuracy([g for g in groups if len(g.rewards) == k]) for k in ks},
        "reward_mean": statistics.fmean(flat),
        "reward_std": statistics.pstdev(flat),
        "length_correlation": slow_spearman(flat, [x for g in groups for x in g.lengths]),
        "ece": ece,
        "ece_bins": table,
    }
    if ties:
        want["tie_accuracy"] = sum(d < LossConfig().tie_threshold for d in ties) / len(ties)
        want["num_tie_pairs"] = len(ties)
    return want


@pytest.mark.parametrize("seed, l2_coef, bins", [(0, 0.0, 10), (1, 0.1, 10), (2, 0.0, 7), (3, 0.05, 1)])
def test_every_field_matches_python_loops(seed, l2_coef, bins):
    groups = random_groups(seed)
    got = report(groups, LossConfig(l2_rewards_coef=l2_coef), ece_bins=bins)
    want = slow_report(groups, l2_coef, bins)
    assert set(got) == set(want)
    assert got["accuracy_by_k"].keys() == want["accuracy_by_k"].keys() and len(got["accuracy_by_k"]) > 3
    assert len(got["ece_bins"]) == len(want["ece_bins"])
    for g_bin, w_bin in zip(got["ece_bins"], want["ece_bins"], strict=True):
        assert g_bin == pytest.approx(w_bin, abs=1e-12)
    assert got.pop("accuracy_by_k") == pytest.approx(want.pop("accuracy_by_k"), abs=1e-12)
    del got["ece_bins"], want["ece_bins"]
    assert got == pytest.approx(want, abs=1e-12)
    assert want["num_pairs"] > 300 and 0 < want["ece"] and want["length_correlation"] is not None
    assert want["num_tie_pairs"] > 0 and any(not pairs_of(g) for g in groups)  # τ skips prompts without a pair
    assert json.loads(json.dumps(report(groups), allow_nan=False))


def test_subsets_and_rewardbench_sections_match_python_loops():
    groups = random_groups(4, n_groups=80)
    got = report(groups, subsets=[g.subset for g in groups])
    present = sorted({g.subset for g in groups})
    assert got["subset_counts"] == {s: sum(g.subset == s for g in groups) for s in present}
    want = {s: slow_accuracy([g for g in groups if g.subset == s]) for s in present}
    assert got["subset_accuracy"] == pytest.approx(want, abs=1e-12)
    acc = want
    chat = (acc["alpacaeval-easy"] * 100 + acc["mt-bench-med"] * 40) / 140
    chat_hard = acc["llmbar-natural"]
    safety = (acc["donotanswer"] * 136 + acc["xstest-should-refuse"] * 250 + acc["xstest-should-respond"] * 154) / 540
    reasoning = (acc["math-prm"] * 984 + acc["hep-go"] * 164 + acc["hep-js"] * 164) / (984 + 2 * 164)
    prior = (acc["shp"] + acc["summarize"]) / 2
    assert got["rewardbench"] == pytest.approx(
        {
            "Chat": chat,
            "Chat Hard": chat_hard,
            "Safety": safety,
            "Reasoning": reasoning,
            "score": (chat + chat_hard + safety + reasoning) / 4,
            "Prior Sets": prior,
            "score_with_prior_sets": (2 * (chat + chat_hard + safety + reasoning) + prior) / 9,
        },
        abs=1e-12,
    )
    json.dumps(got, allow_nan=False)


def test_rewardbench_by_hand():
    """Pairs right (+) or wrong (−), hand-scored with RewardBench's weights (alpacaeval-easy 100, mt-bench-easy 28,
    math-prm 984, hep-* 164); a K = 3 prompt counts its 3 pairs."""
    right, wrong, tie = [2.0, 1.0], [1.0, 2.0], [1.0, 1.0]
    rows = [
        ("alpacaeval-easy", right),
        ("alpacaeval-easy", wrong),
        ("alpacaeval-easy", tie),  # a tie is wrong: 1/3
        ("mt-bench-easy", right),  # 1
        ("math-prm", wrong),  # 0
        ("hep-go", right),  # 1
        ("hep-rust", [3.0, 1.0, 2.0]),  # pairs (3>1 ✓, 3>2 ✓, 1>2 ✗): 2/3
        ("shp", right),  # 1
        ("summarize", wrong),  # 0
        ("my-own-set", [5.0, 4.0, 3.0, 2.0]),  # 1, in no section
    ]
    groups = [Group(r, list(range(len(r))), [1] * len(r), 0.0, s) for s, r in rows]
    got = report(groups, subsets=[s for s, _ in rows])
    assert got["subset_accuracy"] == pytest.approx(
        {
            "alpacaeval-easy": 1 / 3,
            "mt-bench-easy": 1.0,
            "math-prm": 0.0,
            "hep-go": 1.0,
            "hep-rust": 2 / 3,
            "shp": 1.0,
            "summarize": 0.0,
            "my-own-set": 1.0,
        }
    )
    assert got["subset_counts"]["alpacaeval-easy"] == 3 and got["subset_counts"]["hep-rust"] == 1
    chat = (100 * (1 / 3) + 28 * 1.0) / 128  # = 0.4791666…
    reasoning = (984 * 0.0 + 164 * 1.0 + 164 * (2 / 3)) / (984 + 164 + 164)  # = 0.2083333…
    assert chat == pytest.approx(0.47916666666) and reasoning == pytest.approx(0.20833333333)
    assert got["rewardbench"] == pytest.approx(
        {
            "Chat": chat,
            "Reasoning": reasoning,  # Chat Hard and Safety have no subset here: left out, not 0
            "score": (chat + reasoning) / 2,
            "Prior Sets": 0.5,
            "score_with_prior_sets": (2 * chat + 2 * reasoning + 0.5) / 5,
        }
    )


def test_math_prm_weighs_as_much_as_all_six_code_subsets():
    hep = ["hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"]
    rows = [("math-prm", [1.0, 2.0])] + [(s, [2.0, 1.0]) for s in hep]  # math 0, every hep-* 1
    groups = [Group(r, [0, 1], [1, 1], 0.0, s) for s, r in rows]
    got = report(groups, subsets=[s for s, _ in rows])
    assert got["rewardbench"] == {"Reasoning": 0.5, "score": 0.5}  # not 6/7, the row-weighted mean
    assert got["pairwise_accuracy"] == pytest.approx(6 / 7)


def test_accuracy_by_k_on_mixed_k():
    groups = [
        Group([2.0, 1.0], [0, 1], [1, 1], 0.0),  # K=2 right
        Group([0.0, 1.0], [0, 1], [1, 1], 0.0),  # K=2 wrong
        Group([3.0, 1.0, 2.0], [0, 1, 2], [1, 1, 1], 0.0),  # K=3 2 of 3
        Group([4.0, 3.0, 2.0, 1.0, 0.0], [0, 1, 2, 3, 4], [1] * 5, 0.0),  # K=5 10 of 10
        Group([1.0, 0.0], [0, 0], [1, 1], 0.0),  # K=2 with tied ranks: no pair
    ]
    got = report(groups)
    assert got["accuracy_by_k"] == pytest.approx({"2": 0.5, "3": 2 / 3, "5": 1.0})
    assert got["num_pairs"] == 2 + 3 + 10 and got["num_prompts"] == 5
    assert got["pairwise_accuracy"] == pytest.approx(13 / 15)
    only_tied = report(groups[-1:])
    assert only_tied["accuracy_by_k"] == {"2": None} and only_tied["ece"] is None and only_tied["ece_bins"] == []


def test_length_correlation_is_null_when_a_side_is_constant():
    groups = [Group([1.0, 3.0, 2.0], [0, 1, 2], [7, 7, 7], 0.0), Group([0.5, 4.0], [0, 1], [7, 7], 0.0)]
    assert report(groups)["length_correlation"] is None
    groups = [Group([2.0, 2.0], [0, 1], [3, 9], 0.0)]  # constant rewards
    assert report(groups)["length_correlation"] is None
    groups = [Group([1.0, 2.0, 2.0, 5.0], [0, 1, 2, 3], [10, 30, 20, 40], 0.0)]  # longer → higher, one tie
    got = report(groups)["length_correlation"]
    assert got == pytest.approx(slow_spearman([1.0, 2.0, 2.0, 5.0], [10, 30, 20, 40])) and got > 0.9


def test_calibration_by_hand():
    """Pair differences 0, +1, −1, +3 with 5 bins of width 0.1 from 0.5: the tie is wrong at confidence 0.5."""
    groups = [Group([d, 0.0], [0, 1], [1, 1], 0.0) for d in (0.0, 1.0, -1.0, 3.0)]
    got = report(groups, ece_bins=5)
    s1, s3 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-3))  # 0.731 (bin [0.7, 0.8)), 0.953 (bin [0.9, 1])
    want = [
        {"lower": 0.5, "upper": 0.6, "count": 1, "accuracy": 0.0, "confidence": 0.5},
        {"lower": 0.7, "upper": 0.8, "count": 2, "accuracy": 0.5, "confidence": s1},
        {"lower": 0.9, "upper": 1.0, "count": 1, "accuracy": 1.0, "confidence": s3},
    ]
    assert len(got["ece_bins"]) == len(want)
    for g_bin, w_bin in zip(got["ece_bins"], want, strict=True):
        assert g_bin == pytest.approx(w_bin)
    assert got["ece"] == pytest.approx(0.25 * 0.5 + 0.5 * abs(0.5 - s1) + 0.25 * (1 - s3))
    on_edge = [Group([math.log(3), 0.0], [0, 1], [1, 1], 0.0)]  # σ(ln 3) = 0.75 exactly: the upper bin's lower edge
    bins = report(on_edge, ece_bins=2)["ece_bins"]
    assert [(b["lower"], b["upper"], b["count"]) for b in bins] == [(0.75, 1.0, 1)]
    confident_right = [Group([20.0, -20.0], [0, 1], [1, 1], 0.0)] * 3
    assert report(confident_right)["ece"] == pytest.approx(0.0, abs=1e-12)
    confident_wrong = [Group([-20.0, 20.0], [0, 1], [1, 1], 0.0)] * 3
    assert report(confident_wrong)["ece"] == pytest.approx(1.0, abs=1e-12)


CONFIGS = [
    LossConfig(),
    LossConfig(objective="listmle", center_rewards_coef=0.1),
    LossConfig(pair_weighting="per_pair", tie_coef=0.5, l2_rewards_coef=0.2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "listmle+center", "per_pair+ties+l2"])
def test_agrees_with_the_training_loss_and_metrics(cfg):
    """The report's training numbers are bigrm.objectives.ranking's on fp32 rewards, as in training, for any cfg."""
    groups = random_groups(5)
    rewards, labels, lengths = tensors(groups, dtype=torch.float32)
    loss, stats = ranking_loss(rewards, labels, cfg)
    train = metrics(stats, cfg)
    got = ranking_report(rewards, labels, lengths, cfg)
    assert got["num_pairs"] == train["num_pairs"] and got["num_prompts"] == train["num_prompts"] == len(groups)
    assert got["num_tie_pairs"] == train["num_tie_pairs"] > 0
    for key in ("pairwise_accuracy", "kendall_tau", "tie_accuracy"):
        assert got[key] == pytest.approx(train[key], abs=1e-12), key
    for key in ("loss", "reward_mean", "reward_std"):
        assert got[key] == pytest.approx(train[key], rel=1e-5), key
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    if cfg != LossConfig():  # the cfg reaches the loss
        assert got["loss"] != pytest.approx(ranking_report(rewards, labels, lengths, LossConfig())["loss"], rel=1e-3)


def test_a_reward_that_needs_grad_and_float32_inputs_are_fine():
    groups = random_groups(6, n_groups=10)
    rewards, labels, lengths = tensors(groups, dtype=torch.float32)
    got = ranking_report(rewards.requires_grad_(), labels, lengths, LossConfig())
    want = ranking_report(rewards.detach().double(), labels, lengths, LossConfig())
    assert json.dumps(got) == json.dumps(want)  # the report works in float64 whatever comes in


def test_bad_inputs_are_refused():
    groups = random_groups(7, n_groups=4)
    rewards, labels, lengths = tensors(groups)
    cfg = LossConfig()
    with pytest.raises(ValueError, match="subset names"):
        ranking_report(rewards, labels, lengths, cfg, subsets=["a"])
    with pytest.raises(ValueError, match="shape"):
        ranking_report(rewards, labels, lengths[1:], cfg)
    with pytest.raises(ValueError, match="NaN"):
        ranking_report(rewards.clone().fill_(math.nan), labels, lengths, cfg)
    labels.num_groups = 2
    with pytest.raises(ValueError, match="seg_group"):
        ranking_report(rewards, labels, lengths, cfg)
