"""The stepwise row format (TRL's stepwise supervision, a process reward model's rows) and the Example of stepwise
solutions as data.step_separator, step_token and step_layout lay them out (training, scoring and serving build them
here)."""

from __future__ import annotations

import itertools
from dataclasses import replace

from bigrm.config import STEPS_WITH_ATTRIBUTES, DataConfig
from bigrm.data.examples import Example, RowError, SplitSteps, Text, finite_number
from bigrm.data.labels import Labels
from bigrm.data.row_format import RowFormat, row_weight
from bigrm.errors import DataError


class Stepwise(RowFormat):
    """Stepwise supervision: rows with the same prompt form unranked groups (DataConfig.step_group_size)."""

    name = "stepwise"
    description = "{prompt, completions: [step, ...], labels: [correct?, ...]}: one solution, a label per step"

    def detects(self, columns: set[str], cfg: DataConfig, path: str) -> bool:
        if not (cfg.completions_column in columns and cfg.labels_column in columns):
            return False
        if cfg.attributes:
            raise DataError(f"{path}: {STEPS_WITH_ATTRIBUTES}")
        return True

    def expected(self, cfg: DataConfig) -> str | None:
        return f"{cfg.completions_column!r} and {cfg.labels_column!r} (stepwise)"

    def piece_columns(self, cfg: DataConfig) -> list[tuple[str, bool]] | str:
        return "stepwise rows are scored at every step (step_rewards) without --segments"

    def example(self, row: dict, margin: float, cfg: DataConfig, where: str) -> Example | RowError:
        """One solution: its steps joined, each followed by the separator (data.step_token or step_separator), with one
        label per step."""
        prompt = self.prompt(row, cfg, where)
        if isinstance(prompt, RowError):
            return prompt
        col, lab = cfg.completions_column, cfg.labels_column
        steps, labels = row.get(col), row.get(lab)
        if not isinstance(steps, list) or not steps:
            return RowError(where, col, f"must be a non-empty list of steps, got {steps!r:.60}")
        for i, step in enumerate(steps):
            if not isinstance(step, str):
                return RowError(where, f"{col}[{i}]", f"a step must be text, got {type(step).__name__}")
            if not step.strip():
                return RowError(where, f"{col}[{i}]", "empty step")
        if not isinstance(labels, list) or len(labels) != len(steps):
            got = f"{len(labels)} labels" if isinstance(labels, list) else repr(labels)
            return RowError(where, lab, f"needs one label per step ({len(steps)}), got {got}")
        for i, v in enumerate(labels):
            if not (isinstance(v, bool) or (finite_number(v) and 0 <= v <= 1)):
                return RowError(where, f"{lab}[{i}]", f"must be a boolean or a probability in [0, 1], got {v!r}")
        weight = row_weight(row, cfg)
        if isinstance(weight, RowError):
            return replace(weight, where=where)
        labels = Labels((-1,), steps=(tuple(float(v) for v in labels),), step_weights=(weight,))
        return step_solutions(prompt, [steps], where, cfg, labels)


def step_solutions(
    prompt: Text, solutions: list[list[str]], where: str, cfg: DataConfig, labels: Labels | None = None
) -> Example:
    """The Example of stepwise solutions (each a list of steps) as data.step_separator / step_token / step_layout
    lay them out: every step followed by the separator (or the step token), split for the trl layout."""
    separator = cfg.step_token or cfg.step_separator
    pieces = [[step + separator for step in steps] for steps in solutions]
    ends = tuple(tuple(int(e) for e in itertools.accumulate(len(p) for p in ps)) for ps in pieces)
    split = tuple(SplitSteps(tuple(steps), separator) for steps in solutions) if cfg.step_layout == "trl" else None
    joined = tuple("".join(ps) for ps in pieces)
    return Example(prompt, joined, where, labels or Labels(), step_ends=ends, split_steps=split)
