"""What every row format answers (RowFormat) and the parsing they share: a row's prompt, completions, margin,
weight and attribute ratings into an Example. The formats are bigrm.data.formats' (stepwise rows:
bigrm.data.stepwise)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

from bigrm.config import DataConfig
from bigrm.data.examples import (
    Example,
    RowError,
    Text,
    check_messages,
    completion,
    finite_number,
    is_messages,
)
from bigrm.data.labels import Labels

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
        weight = row_weight(row, cfg)
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


def row_weight(row: dict, cfg: DataConfig) -> float | RowError:
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
