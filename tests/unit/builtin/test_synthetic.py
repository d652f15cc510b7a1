"""The built-in length-biased task (training labels prefer the longer review, held-out pairs are length-balanced) and
the noisy-label task (a share of training pairs flipped, held-out pairs clean)."""

from __future__ import annotations

import json

import pytest

from bigrm import options
from bigrm.builtin.synthetic import LENGTHS, NEGATIVE, POSITIVE, make_length_rows, make_noisy_rows, make_rows
from bigrm.data.pipeline import synthetic_paths, write_synthetic
from bigrm.errors import ConfigError


def quality(row: dict, text: str) -> int:
    wanted, opposite = (POSITIVE, NEGATIVE) if "positive" in row["prompt"] else (NEGATIVE, POSITIVE)
    words = text.split()
    return sum(w in wanted for w in words) - sum(w in opposite for w in words)


def longer_first(row: dict) -> bool:
    first, second = (len(t.split()) for t in row["ranked_outputs"])
    return first > second


def test_training_labels_prefer_the_longer_review_against_the_true_rule():
    rows = make_length_rows(4000, 0, 0.6, held_out=False)
    assert all(LENGTHS[0] <= len(t.split()) <= LENGTHS[1] for r in rows for t in r["ranked_outputs"])
    right = [quality(r, r["ranked_outputs"][0]) > quality(r, r["ranked_outputs"][1]) for r in rows]
    # half the pairs have the better review the longer; 60 % of the others are labelled for the longer
    assert sum(map(longer_first, rows)) / len(rows) == pytest.approx(0.8, abs=0.02)
    assert sum(right) / len(rows) == pytest.approx(0.7, abs=0.02)
    assert all(longer_first(r) for r, ok in zip(rows, right, strict=True) if not ok)
    unbiased = make_length_rows(1000, 0, 0.0, held_out=False)
    assert all(quality(r, r["ranked_outputs"][0]) > quality(r, r["ranked_outputs"][1]) for r in unbiased)


def test_held_out_pairs_follow_quality_and_are_length_balanced():
    rows = make_length_rows(400, 1, 0.6, held_out=True)
    assert all(quality(r, r["ranked_outputs"][0]) > quality(r, r["ranked_outputs"][1]) for r in rows)
    assert sum(map(longer_first, rows)) == 200


def test_the_task_option_writes_both_files(tmp_path):
    cfg = options.build(
        {"data.synthetic.task": "length", "data.synthetic.num_train": 50, "data.synthetic.num_eval": 10}
    )
    write_synthetic(cfg.data, tmp_path, seed=3)
    (train,), held = synthetic_paths(tmp_path, cfg.data)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert rows == make_length_rows(50, 3, 0.6, held_out=False) and len(held.read_text().splitlines()) == 10
    with pytest.raises(ConfigError, match="length_bias: must be <= 1"):
        options.build({"data.synthetic.length_bias": 1.5})


def test_noisy_pairs_flip_a_share_of_the_training_labels_and_none_held_out():
    rows = make_noisy_rows(4000, 0, 0.25, held_out=False)
    right = [quality(r, r["ranked_outputs"][0]) > quality(r, r["ranked_outputs"][1]) for r in rows]
    assert all(len(r["ranked_outputs"]) == 2 for r in rows)
    assert 1 - sum(right) / len(rows) == pytest.approx(0.25, abs=0.02)
    clean = make_noisy_rows(400, 1, 0.25, held_out=True)
    assert clean == make_rows(400, 2, 2, 1)
    assert all(quality(r, r["ranked_outputs"][0]) > quality(r, r["ranked_outputs"][1]) for r in clean)
    cfg = options.build({"data.synthetic.task": "noisy", "data.synthetic.noise": 0.5})
    assert cfg.data.synthetic.noise == 0.5
    with pytest.raises(ConfigError, match="noise: must be <= 1"):
        options.build({"data.synthetic.noise": 1.5})
