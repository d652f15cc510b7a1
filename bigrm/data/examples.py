"""What a row becomes (an Example, or a RowError saying what is wrong with it) and the value checks every row format
shares: bigrm.data.formats parses rows into these, bigrm.data.rows reads files of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from bigrm.data.labels import Labels

Text = str | list[dict]  # plain text, or chat messages [{"role", "content"}, ...]


class SplitSteps(NamedTuple):
    """A stepwise solution under data.step_layout=trl: its steps and their separator, each tokenised alone."""

    steps: tuple[str, ...]
    separator: str


@dataclass(frozen=True)
class Example:
    prompt: Text
    completions: tuple[Text, ...]  # best first (scored rows: in the row's order)
    source: str  # "file:line N" / "file:row N", for error messages further down the chain
    labels: Labels = Labels()
    # stepwise: per completion, the character offset in its text where each step (with its separator) ends
    step_ends: tuple[tuple[int, ...], ...] | None = None
    split_steps: tuple[SplitSteps, ...] | None = None  # stepwise, trl step layout: per completion, its steps


@dataclass
class RowError:
    where: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: field {self.field!r}: {self.reason}"


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value) and len(value) > 0


ROLES = ("system", "user", "assistant", "tool")  # what chat templates render; anything else is a typo or a dialect


def check_messages(value: list, field: str) -> str | None:
    for i, m in enumerate(value):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} needs string 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}, not one of {', '.join(ROLES)}"
        if not m["content"].strip():
            return f"message {i} has empty content"
    return None


def completion(value: Any, field: str) -> tuple[Text | None, str | None]:
    """A completion is a non-empty string or a non-empty list of chat messages."""
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, "empty completion")
    if is_messages(value):
        problem = check_messages(value, field)
        return (value, None) if problem is None else (None, problem)
    return None, f"must be a non-empty string or a list of chat messages, got {type(value).__name__}"


FLOAT32_MAX = 3.4028234663852886e38  # labels are float32 tensors (packing.SegmentLabels): larger becomes inf


def finite_number(value: Any) -> bool:
    """A JSON number (not a numeric string: "1.5" is rejected, not converted) that float32 holds as a finite value."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= FLOAT32_MAX
