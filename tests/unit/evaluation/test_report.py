"""`bigrm eval --report DIR`: the PNG files are real images, and the numbers drawn (report.json) equal a plain
recomputation from the rewards `bigrm score` gives the same rows."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import sys

import numpy as np
import pytest

from bigrm import cli
from bigrm.builtin.synthetic import make_rows
from tests.helpers.paths import HH_DATA

PLOTS = ("reliability.png", "reward_hist.png", "reward_length.png", "accuracy.png")
SUBSETS = ("alpha", "beta", "gamma")


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, equal values sharing the mean of their positions."""
    order = sorted(values)
    return [np.mean([i + 1 for i, v in enumerate(order) if v == x]) for x in values]


def scored(tmp_path, model, data, *flags: str) -> list[dict]:
    """Each row with its rewards (with --per-token: its completion tokens) by `bigrm score`."""
    out = tmp_path / "scored.jsonl"
    assert cli.score_main(["--model", str(model), "--data", str(data), "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def evaluated(tmp_path, model, data, name: str) -> tuple[dict, dict]:
    report = tmp_path / name
    args = [
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(tmp_path / f"{name}.json"),
        "--report",
        str(report),
    ]
    assert cli.eval_main(args) == 0
    for plot in PLOTS:
        assert (report / plot).stat().st_size > 5000
    return json.loads((tmp_path / f"{name}.json").read_text()), json.loads((report / "report.json").read_text())


def test_report_draws_what_a_plain_recomputation_finds(tmp_path, llama_dir):
    import matplotlib.image

    rows = [
        {
            "prompt": row["prompt"],
            "subset": SUBSETS[i % 3],
            "ranked_outputs": [c + " ok" * ((i + k) % 4) for k, c in enumerate(row["ranked_outputs"])],
        }
        for i, row in enumerate(make_rows(40, 2, 4, seed=3))
    ]  # fmt: skip  completions of several lengths
    data = tmp_path / "ranked.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics, drawn = evaluated(tmp_path, llama_dir, data, "report")
    # the rewards as eval computes them (per-token scoring lays sequences out differently: float32 rounding differs)
    rewards = [
        r["rewards"] for r in scored(tmp_path, llama_dir, data)
    ]  # per row, best completion first (ranked_outputs order, no ties)

    # reliability: every pair (i better than j) binned by its confidence σ(|r_i - r_j|) over [0.5, 1] in 10 bins
    bins = [[0, 0, 0.0] for _ in range(10)]  # count, right, confidence sum
    for r in rewards:
        for i, j in itertools.combinations(range(len(r)), 2):
            confidence = 1 / (1 + math.exp(-abs(r[i] - r[j])))
            b = min(int((confidence - 0.5) * 20), 9)
            bins[b][0] += 1
            bins[b][1] += r[i] > r[j]
            bins[b][2] += confidence
    expected = [(b, n, right / n, total / n) for b, (n, right, total) in enumerate(bins) if n]
    got = [
        (round((x["lower"] - 0.5) * 20), x["count"], x["accuracy"], x["confidence"])
        for x in drawn["reliability"]["bins"]
    ]
    assert [e[:2] for e in got] == [e[:2] for e in expected] and len(got) >= 1
    assert np.allclose([e[2:] for e in got], [e[2:] for e in expected], atol=1e-12)
    n = sum(b[0] for b in bins)
    ece = sum(abs(right - total) for _, right, total in bins) / n
    assert drawn["reliability"]["ece"] == pytest.approx(ece, abs=1e-12) == metrics["ece"]

    # histograms: best (first) against worst (last) completion of every row, on the drawn bin edges
    histogram = drawn["reward_histogram"]
    best, worst = [r[0] for r in rewards], [r[-1] for r in rewards]
    edges = histogram["edges"]
    assert histogram["series"] == ["best", "worst"] and len(edges) == 31
    assert edges[0] == pytest.approx(min(best + worst)) and edges[-1] == pytest.approx(max(best + worst))
    for values, counts in zip((best, worst), histogram["counts"], strict=True):
        assert counts == np.histogram(values, bins=edges)[0].tolist() and sum(counts) == 40

    # reward against completion length
    flat = [x for r in rewards for x in r]
    lengths = [len(ids) for row in scored(tmp_path, llama_dir, data, "--per-token") for ids in row["per_token_ids"]]
    rho = np.corrcoef(average_ranks(flat), average_ranks(lengths))[0, 1]
    assert drawn["reward_length"]["spearman_rho"] == pytest.approx(rho, abs=1e-9)
    assert drawn["reward_length"]["points"] == len(flat)

    # accuracy by K and by subset
    def accuracy(selected) -> float:
        pairs = [(r[i], r[j]) for r in selected for i, j in itertools.combinations(range(len(r)), 2)]
        return sum(a > b for a, b in pairs) / len(pairs)

    by_k = {str(k): accuracy([r for r in rewards if len(r) == k]) for k in sorted({len(r) for r in rewards})}
    by_subset = {s: accuracy([r for r, row in zip(rewards, rows, strict=True) if row["subset"] == s]) for s in SUBSETS}
    assert drawn["accuracy"]["by_k"] == pytest.approx(by_k) and len(by_k) == 3
    assert drawn["accuracy"]["by_subset"] == pytest.approx(by_subset)
    assert drawn["accuracy"]["prompts_by_subset"] == {"alpha": 14, "beta": 13, "gamma": 13}
    assert drawn["accuracy"]["prompts_by_k"] == {k: sum(len(r) == int(k) for r in rewards) for k in by_k}
    assert 0 < min(by_subset.values()) and max(by_subset.values()) < 1  # the comparison above can fail

    # the images are images, and report.md embeds them with the metrics
    for plot in PLOTS:
        image = matplotlib.image.imread(tmp_path / "report" / plot)  # (H, W, 4) RGBA
        assert image.shape[0] >= 300 and image.shape[1] >= 300 and image.std() > 0.05
    page = (tmp_path / "report" / "report.md").read_text()
    assert all(f"]({plot})" in page for plot in PLOTS)
    assert f"| pairwise_accuracy | {metrics['pairwise_accuracy']:.4g} |" in page


def test_pairs_are_drawn_as_chosen_and_rejected_by_file(tmp_path, llama_dir):
    data = tmp_path / "hh.jsonl"
    with gzip.open(HH_DATA, "rt") as fh:
        data.write_text("".join(itertools.islice(fh, 24)))
    _, drawn = evaluated(tmp_path, llama_dir, data, "hh")
    assert drawn["reward_histogram"]["series"] == ["chosen", "rejected"]
    assert (
        list(drawn["accuracy"]["by_subset"]) == ["hh.jsonl"]
        and drawn["accuracy"]["prompts_by_subset"]["hh.jsonl"] == 24
    )


def test_report_needs_matplotlib_before_any_scoring(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importlib finds no such module
    report = tmp_path / "report"
    args = ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "none.jsonl"), "--report", str(report)]
    assert cli.eval_main(args) == 2
    assert "pip install 'bigrm[report]'" in capsys.readouterr().err and not report.exists()


def test_training_without_matplotlib_says_the_report_was_not_drawn(tmp_path, monkeypatch):
    import torch

    from bigrm.config import LossConfig
    from bigrm.data.sequences import Group
    from bigrm.evaluation.report import write_for_groups

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    groups = [Group((np.arange(5), np.arange(4)), "eval.jsonl:line 1")]
    line = write_for_groups(tmp_path / "eval_report", groups, torch.tensor([1.0, 0.0]), LossConfig())
    assert "not drawn" in line and "pip install 'bigrm[report]'" in line and not (tmp_path / "eval_report").exists()


def hh_examples(n: int):
    from bigrm.data.examples import Example
    from bigrm.data.labels import Labels

    with gzip.open(HH_DATA, "rt") as fh:
        rows = [json.loads(line) for line in itertools.islice(fh, n)]
    prompts = [r["chosen"][: r["chosen"].rfind("\n\nAssistant:") + 12] for r in rows]
    return [
        Example(p, (r["chosen"][len(p) :], r["rejected"][len(p) :]), f"hh.jsonl:line {i + 1}", Labels(ranks=(0, 1)))
        for i, (p, r) in enumerate(zip(prompts, rows, strict=True))
        if r["rejected"].startswith(p)
    ]


def test_the_trainers_report_measures_a_completion_from_its_first_token_as_bigrm_eval_does(tmp_path):
    """HH prompts cut from the left to max_length: the completions of a prompt no longer share a prefix, yet each is
    as long as `bigrm eval` measures it (from its completion start), not the whole sequence."""
    import torch

    from bigrm.builtin.tiny import build_tokenizer
    from bigrm.config import LossConfig
    from bigrm.data.sequences import scored_sequence
    from bigrm.data.tokenise import tokenize_examples
    from bigrm.evaluation.report import write_for_groups

    tok, examples = build_tokenizer(), hh_examples(120)
    groups, report = tokenize_examples(examples, tok, max_length=256, overlong="skip")
    assert report.prompts_cut > 20 and len(groups) > 30
    rewards = torch.randn(sum(len(g.seqs) for g in groups), generator=torch.Generator().manual_seed(0))
    write_for_groups(tmp_path / "eval_report", groups, rewards.double(), LossConfig())
    kept = {g.source for g in groups}
    lengths = [
        len(s.ids) - s.completion_start
        for ex in examples
        if ex.source in kept
        for s in (scored_sequence(tok, ex.prompt, c, 256) for c in ex.completions)
    ]
    assert len(set(lengths)) > 10 and max(lengths) < 256
    rho = np.corrcoef(average_ranks(rewards.tolist()), average_ranks(lengths))[0, 1]
    drawn = json.loads((tmp_path / "eval_report" / "report.json").read_text())
    assert drawn["reward_length"]["spearman_rho"] == pytest.approx(rho, abs=1e-9)


def test_equal_lengths_are_said_not_drawn_as_a_vertical_line(tmp_path):
    import torch

    from bigrm.config import LossConfig
    from bigrm.data.labels import Labels
    from bigrm.data.sequences import Group
    from bigrm.evaluation.report import write_for_groups

    groups = [
        Group((np.array([1, 2, 3 + g, 4]), np.array([1, 2, 9, 5 + g])), f"e.jsonl:line {g}", Labels(ranks=(0, 1)), None,
              (2, 2))
        for g in range(6)
    ]  # fmt: skip
    write_for_groups(tmp_path / "r", groups, torch.linspace(0, 1, 12, dtype=torch.float64), LossConfig())
    drawn = json.loads((tmp_path / "r" / "report.json").read_text())["reward_length"]
    assert drawn["spearman_rho"] is None and "every completion is 2 tokens long" in drawn["note"]
