"""Row formats: each one owns how it is recognised from a file's columns, how one row becomes an Example, and which
columns hold its completions (`bigrm score --segments` joins their pieces). Detection tries them in FORMATS' order:
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from typing import Any

from bigrm.config import STEPS_WITH_ATTRIBUTES, DataConfig
from bigrm.data.examples import (
    Example,
    RowError,
    SplitSteps,
    Text,
    check_messages,
    completion,
    finite_number,
    is_messages,
)
from bigrm.data.labels import Labels
from bigrm.errors import DataError

Drawn = tuple[Text, list[Any], list[str], list[int] | None]  # prompt, raw completions, their fields, ranks


class RowFormat:
    """A row format; subclasses fill in what differs between formats."""

    name = ""
    description = ""  # the row's shape, one line (as in this module's docstring)
    rated = False  # one completion with one rating per attribute, rather than a list per attribute

    def detects(self, columns: set[str], cfg: DataConfig, path: str) -> bool:
        raise NotImplementedError

    def expected(self, cfg: DataConfig) -> str | None:
        """The columns that identify the format, for the error naming every format; None: covered by another."""
        return None

    def piece_columns(self, cfg: DataConfig) -> list[tuple[str, bool]] | str:
        """(column, whether it holds a list of completions) for --segments piece lists, or why there are none."""
        raise NotImplementedError

    def drawn(self, row: dict, prompt: Text | None, cfg: DataConfig, where: str) -> Drawn | RowError:
        raise NotImplementedError

    def labelled(self, labels: Labels, row: dict, cfg: DataConfig, where: str) -> Labels | RowError:
        return labels

    def parse(self, row: Any, cfg: DataConfig, where: str) -> Example | RowError:
        if not isinstance(row, dict):
            return RowError(where, "<row>", f"the row is a {type(row).__name__}, not an object")
        margin = row.get(cfg.margin_column)
        if margin is None:
            margin = 0.0
        elif not finite_number(margin):
            return RowError(where, cfg.margin_column, f"must be a number within float32's range, got {margin!r}")
        return self.example(row, float(margin), cfg, where)

    def prompt(self, row: dict, cfg: DataConfig, where: str) -> Text | RowError | None:
        """The prompt column's value, checked; None where `drawn` finds the prompt itself."""
        prompt = row.get(cfg.prompt_column)
        if prompt is None:
            return RowError(where, cfg.prompt_column, "missing")
        if is_messages(prompt):
            problem = check_messages(prompt, cfg.prompt_column)
            if problem:
                return RowError(where, cfg.prompt_column, problem)
        elif not isinstance(prompt, str):
            return RowError(where, cfg.prompt_column, f"must be text or chat messages, got {type(prompt).__name__}")
        return prompt

    def example(self, row: dict, margin: float, cfg: DataConfig, where: str) -> Example | RowError:
        prompt = self.prompt(row, cfg, where)
        drawn = prompt if isinstance(prompt, RowError) else self.drawn(row, prompt, cfg, where)
        if isinstance(drawn, RowError):
            return drawn
        prompt, raw, fields, ranks = drawn
        completions = _completions(prompt, raw, fields, where)
        if isinstance(completions, RowError):
            return completions
        weight = _row_weight(row, cfg)
        if isinstance(weight, RowError):
            return replace(weight, where=where)
        labels = Labels(tuple(range(len(completions))), margin=margin, weight=float(weight))
        if cfg.attributes:
            ratings = attribute_ratings(row, cfg, len(completions), self.rated, where)
            if isinstance(ratings, RowError):
                return ratings
            labels = replace(labels, attributes=ratings)
        if ranks is not None:
            labels = replace(labels, ranks=tuple(ranks))
        labels = self.labelled(labels, row, cfg, where)
        return labels if isinstance(labels, RowError) else Example(prompt, tuple(completions), where, labels)


def _completions(prompt: Text, raw: list[Any], fields: list[str], where: str) -> list[Text] | RowError:
    """The validated completions: each well-formed, chat messages only under a chat prompt, no two the same."""
    completions = []
    for value, name in zip(raw, fields, strict=True):
        text, problem = completion(value, name)
        if problem:
            return RowError(where, name, problem)
        if isinstance(text, list) and not isinstance(prompt, list):
            return RowError(where, name, "chat-message completions need a chat-message prompt")
        completions.append(text)
    seen: dict[str, str] = {}
    for text, name in zip(completions, fields, strict=True):
        key = json.dumps(text, sort_keys=True)
        if key in seen:
            return RowError(where, name, f"duplicate of {seen[key]} under the same prompt")
        seen[key] = name
    return completions


class Listed(RowFormat):
    """Completions in one list column: ranked (best first, tie blocks) and scored (ranked by their scores)."""

    by_position = False  # ranked by their place in the list, a tie block sharing one place

    def column(self, cfg: DataConfig) -> str:
        raise NotImplementedError

    def piece_columns(self, cfg: DataConfig) -> list[tuple[str, bool]] | str:
        return [(self.column(cfg), True)]

    def drawn(self, row: dict, prompt: Text | None, cfg: DataConfig, where: str) -> Drawn | RowError:
        col = self.column(cfg)
        listed = row.get(col)
        if listed is None:
            return RowError(where, col, "missing")
        if not isinstance(listed, list):
            return RowError(where, col, f"must be a list, got {type(listed).__name__}")
        raw, fields, ranks = [], [], []
        for i, entry in enumerate(listed):
            # a list that is not one chat conversation is a block of completions tied at this rank
            block = self.by_position and isinstance(entry, list) and not is_messages(entry)
            if block and not entry:
                return RowError(where, f"{col}[{i}]", "an empty list of tied completions")
            for j, value in enumerate(entry if block else [entry]):
                raw.append(value)
                fields.append(f"{col}[{i}][{j}]" if block else f"{col}[{i}]")
                ranks.append(i)
        if len(raw) < 2:
            return RowError(where, col, f"needs at least 2 completions, got {len(raw)}")
        return prompt, raw, fields, ranks if self.by_position else None


class Ranked(Listed):
    name = "ranked"
    by_position = True
    description = "{prompt, ranked_outputs: [best, ..., worst]}: a list that is not a conversation is a tie block"

    def detects(self, columns: set[str], cfg: DataConfig, path: str) -> bool:
        return cfg.ranked_column in columns

    def expected(self, cfg: DataConfig) -> str | None:
        return f"{cfg.ranked_column!r} (ranked)"

    def column(self, cfg: DataConfig) -> str:
        return cfg.ranked_column


class Scored(Listed):
    name = "scored"
    description = "{prompt, completions: [completion, ...], scores: [number, ...]}: ranked by score"

    def detects(self, columns: set[str], cfg: DataConfig, path: str) -> bool:
        return cfg.completions_column in columns and cfg.scores_column in columns

    def expected(self, cfg: DataConfig) -> str | None:
        return f"{cfg.completions_column!r} and {cfg.scores_column!r} (scored)"

    def column(self, cfg: DataConfig) -> str:
        return cfg.completions_column

    def labelled(self, labels: Labels, row: dict, cfg: DataConfig, where: str) -> Labels | RowError:
        scores, k = row.get(cfg.scores_column), len(labels.ranks)  # one rank per completion so far
        if not isinstance(scores, list) or len(scores) != k:
            return RowError(where, cfg.scores_column, f"needs one number per completion ({k})")
        bad = next((i for i, v in enumerate(scores) if not finite_number(v)), None)
        if bad is not None:
            return RowError(
                where,
                f"{cfg.scores_column}[{bad}]",
                f"must be a finite number within float32's range, got {scores[bad]!r}",
            )
        distinct = sorted(set(scores), reverse=True)  # equal scores share a rank: ties
        return replace(labels, ranks=tuple(distinct.index(v) for v in scores), scores=tuple(map(float, scores)))


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
        weight = _row_weight(row, cfg)
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


class Pairwise(RowFormat):
    name = "pairwise"
    description = "{prompt, chosen, rejected}"

    def detects(self, columns: set[str], cfg: DataConfig, path: str) -> bool:
        return {cfg.chosen_column, cfg.rejected_column, cfg.prompt_column} <= columns

    def expected(self, cfg: DataConfig) -> str | None:
        return f"{cfg.chosen_column!r} and {cfg.rejected_column!r} (pairwise, with or without {cfg.prompt_column!r})"

    def piece_columns(self, cfg: DataConfig) -> list[tuple[str, bool]] | str:
        return [(cfg.chosen_column, False), (cfg.rejected_column, False)]

    def drawn(self, row: dict, prompt: Text | None, cfg: DataConfig, where: str) -> Drawn | RowError:
        raw, fields = [], [cfg.chosen_column, cfg.rejected_column]
        for col in fields:
            if row.get(col) is None:
                return RowError(where, col, "missing")
            raw.append(row[col])
        return prompt, raw, fields, None


class Implicit(RowFormat):
    name = "implicit"
    description = "{chosen, rejected}: the prompt is their shared prefix (see DataConfig.assistant_marker)"

    def detects(self, columns: set[str], cfg: DataConfig, path: str) -> bool:
        return cfg.chosen_column in columns and cfg.rejected_column in columns

    def piece_columns(self, cfg: DataConfig) -> list[tuple[str, bool]] | str:
        return "--segments with pieces needs an explicit prompt column (or use --separator)"

    def prompt(self, row: dict, cfg: DataConfig, where: str) -> Text | RowError | None:
        return None  # there is no prompt column: the prompt is cut from the completions

    def drawn(self, row: dict, prompt: Text | None, cfg: DataConfig, where: str) -> Drawn | RowError:
        for col in (cfg.chosen_column, cfg.rejected_column):
            if row.get(col) is None:
                return RowError(where, col, "missing")
            _, problem = completion(row[col], col)
            if problem:
                return RowError(where, col, problem)
        split = split_implicit(row[cfg.chosen_column], row[cfg.rejected_column], cfg.assistant_marker)
        if isinstance(split, str):
            return RowError(where, f"{cfg.chosen_column}/{cfg.rejected_column}", split)
        prompt, *raw = split
        return prompt, raw, [cfg.chosen_column, cfg.rejected_column], None


class Rated(RowFormat):
    name = "rated"
    description = "{prompt, response, <attribute>: rating, ...}: one completion rated on data.attributes (HelpSteer2)"
    rated = True

    def detects(self, columns: set[str], cfg: DataConfig, path: str) -> bool:
        if not (cfg.response_column in columns and cfg.prompt_column in columns):
            return False
        if not cfg.attributes:
            raise DataError(
                f"{path}: rows of {cfg.prompt_column!r} and {cfg.response_column!r} are rated completions: name their "
                "rating columns in data.attributes"
            )
        return True

    def expected(self, cfg: DataConfig) -> str | None:
        return f"{cfg.prompt_column!r} and {cfg.response_column!r} (rated, with data.attributes)"

    def piece_columns(self, cfg: DataConfig) -> list[tuple[str, bool]] | str:
        return [(cfg.response_column, False)]

    def drawn(self, row: dict, prompt: Text | None, cfg: DataConfig, where: str) -> Drawn | RowError:
        if row.get(cfg.response_column) is None:
            return RowError(where, cfg.response_column, "missing")
        return prompt, [row[cfg.response_column]], [cfg.response_column], None


# in detection order: a file with several formats' columns is the first of them
FORMATS: dict[str, RowFormat] = {f.name: f for f in (Ranked(), Scored(), Stepwise(), Pairwise(), Implicit(), Rated())}
__doc__ = (__doc__ or "") + "".join(f"  {f.name:<14}{f.description}\n" for f in FORMATS.values())


def detect(columns: set[str], cfg: DataConfig, path: str) -> RowFormat:
    for fmt in FORMATS.values():
        if fmt.detects(columns, cfg, path):
            return fmt
    expected = [e for e in (f.expected(cfg) for f in FORMATS.values()) if e]
    raise DataError(
        f"{path}: cannot tell the format from columns {sorted(columns)}: expected {', '.join(expected[:-1])}, "
        f"or {expected[-1]}; column names are set with data.*_column"
    )


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_implicit(chosen: Text, rejected: Text, marker: str) -> tuple[Text, Text, Text] | str:
    """(prompt, chosen completion, rejected completion) from two full texts/conversations, or a reason."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            return "chosen and rejected conversations share no prompt messages"
        if n == len(chosen) or n == len(rejected):
            return "one conversation is a prefix of the other: nothing left to score"
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, list) or isinstance(rejected, list):
        return "chosen and rejected must both be text or both be chat messages"
    n = _common_prefix(chosen, rejected)
    cut = chosen.rfind(marker, 0, n) if marker else -1
    n = cut + len(marker) if cut >= 0 else n
    if n == 0:
        return "chosen and rejected share no prefix to use as the prompt"
    return chosen[:n], chosen[n:], rejected[n:]


def _row_weight(row: dict, cfg: DataConfig) -> float | RowError:
    weight = row.get(cfg.weight_column)
    weight = 1.0 if weight is None else weight
    if not finite_number(weight) or weight <= 0:
        return RowError("", cfg.weight_column, f"must be a positive number within float32's range, got {weight!r}")
    return float(weight)


def _rating_problem(value: Any, bounds: list[float]) -> str | None:
    """Why a rating that is not null is unusable: not a JSON number, or outside data.attribute_range."""
    if not finite_number(value):
        return f"must be a number within float32's range or null, got {value!r}"
    if bounds and not bounds[0] <= value <= bounds[1]:
        return f"must be within data.attribute_range {bounds}, got {value!r}"
    return None


def attribute_ratings(
    row: dict, cfg: DataConfig, k: int, single: bool, where: str
) -> tuple[tuple[float, ...], ...] | RowError:
    """Per completion, its rating of each data.attributes name (NaN where null or absent): a rated row (`single`)
    holds one number per attribute, other rows a list of k numbers or nulls per attribute."""
    names, columns = cfg.attributes, []
    for name in names:
        value = row.get(name)
        if value is None:
            columns.append([math.nan] * k)
            continue
        if not single and (not isinstance(value, list) or len(value) != k):
            return RowError(where, name, f"needs a list of one rating (a number or null) per completion ({k})")
        for i, v in enumerate([value] if single else value):
            problem = None if v is None else _rating_problem(v, cfg.attribute_range)
            if problem:
                return RowError(where, name if single else f"{name}[{i}]", problem)
        columns.append([float(value)] if single else [math.nan if v is None else float(v) for v in value])
    if single and all(math.isnan(c[0]) for c in columns):
        return RowError(where, "/".join(names), "every rating is missing: the row has nothing to train")
    return tuple(zip(*columns, strict=True))
