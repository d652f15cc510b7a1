"""Stepwise rows (bigrm.data.stepwise) → validated examples, through real files written to tmp_path."""

from __future__ import annotations

import pytest

from bigrm.config import DataConfig
from bigrm.data.rows import load_examples, parse_row
from tests.unit.data.test_rows import ATTRS, load_error, write_lines


def step_row(prompt="p", steps=("a", "b"), labels=(True, False), **extra) -> dict:
    return {"prompt": prompt, "completions": list(steps), "labels": labels if labels is None else list(labels), **extra}


def test_stepwise_rows_join_steps_and_group_solutions_by_prompt(tmp_path):
    """Booleans and probabilities are kept as floats; rows with the same prompt form unranked groups of at most
    data.step_group_size solutions, in file order, each with its row weight."""
    path = write_lines(
        tmp_path / "steps.jsonl",
        [
            step_row(),
            step_row("q", ["x"], [0.25]),
            step_row(steps=["c", "d", "e"], labels=[1, 0.5, 0], weight=2.0),
            step_row(steps=["f"], labels=[True]),
        ],
    )
    (examples,), _ = load_examples([path], DataConfig(step_separator=" ||", step_group_size=2))
    first, rest, other = examples  # groups in order of their prompt's first row
    assert first.prompt == "p" and first.completions == ("a ||b ||", "c ||d ||e ||")
    assert first.step_ends == ((4, 8), (4, 8, 12))
    assert first.labels.steps == ((1.0, 0.0), (1.0, 0.5, 0.0)) and first.labels.step_weights == (1.0, 2.0)
    assert first.labels.ranks == (-1, -1) and not first.labels.ranked
    assert first.source == f"{path}:line 1 (+1 rows with the same prompt)"
    assert rest.source == f"{path}:line 4" and rest.completions == ("f ||",)  # the first group of p was full
    assert other.completions == ("x ||",) and other.labels.steps == ((0.25,),)


def test_stepwise_columns_are_configurable(tmp_path):
    path = write_lines(tmp_path / "steps.jsonl", [{"q": "p", "solution": ["a"], "ok": [True]}])
    cfg = DataConfig(prompt_column="q", completions_column="solution", labels_column="ok")
    (examples,), _ = load_examples([path], cfg)
    assert examples[0].completions == ("a\n",) and examples[0].labels.steps == ((1.0,),)


@pytest.mark.parametrize(
    "row, message",
    [
        (step_row(labels=[True]), "field 'labels': needs one label per step (2), got 1 labels"),
        (step_row(labels=None), "field 'labels': needs one label per step (2), got None"),
        (step_row(steps=["a", " "]), "field 'completions[1]': empty step"),
        (step_row(steps=["a", 3]), "field 'completions[1]': a step must be text, got int"),
        (step_row(steps=[]), "field 'completions': must be a non-empty list of steps"),
        (step_row(labels=[True, 1.5]), "field 'labels[1]': must be a boolean or a probability in [0, 1], got 1.5"),
        (step_row(labels=[-0.1, 1]), "field 'labels[0]': must be a boolean or a probability in [0, 1]"),
        (step_row(labels=["yes", 1]), "field 'labels[0]': must be a boolean or a probability in [0, 1], got 'yes'"),
        (step_row(weight=0), "field 'weight': must be a positive number"),
        (step_row(prompt=3), "field 'prompt': must be text or chat messages, got int"),
    ],
)
def test_stepwise_row_errors_name_the_field(row, message):
    assert message in str(parse_row(row, "stepwise", DataConfig(), "f:line 9"))


def test_every_bad_stepwise_row_is_listed_before_compute(tmp_path):
    path = write_lines(tmp_path / "steps.jsonl", [step_row(), step_row(labels=[1]), step_row(steps=["a", ""])])
    message = load_error(path)
    assert "2 invalid row(s)" in message
    assert f"{path}:line 2: field 'labels': needs one label per step (2), got 1 labels" in message
    assert f"{path}:line 3: field 'completions[1]': empty step" in message


def test_stepwise_rows_and_attributes_are_refused_together(tmp_path):
    path = write_lines(tmp_path / "steps.jsonl", [step_row()])
    assert f"{path}: stepwise rows (process reward models) and data.attributes" in load_error(path, attributes=ATTRS)
