"""What a prompt's completions are trained toward, declared once.

Every field of `Labels` carries its `LabelField` (in the dataclass field's metadata): what one value belongs to (a
completion, the prompt, or one step of a stepwise completion), the reward kind whose loss reads it, the dtype of its
token-store column and what is stored where a prompt has none. bigrm.data.token_store derives its label columns from
it (writing, memory-mapping, a group's Labels again, concatenation) and bigrm.data.packing.SegmentLabels its tensors,
so a new label is one field here (plus a pipeline.CACHE_FORMAT bump: caches then hold another column).

Step ends are positions, not labels: a stepwise Example's `step_ends` (character offsets) and a Group's `steps`
(token indices) say where the model is read; the token store keeps them beside the token offsets (step_offsets,
step_index). A STEP field holds one value per such step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

COMPLETION, PROMPT, STEP = "completion", "prompt", "step"
INDEX = "index"  # the `missing` of ranks: each completion's index in its prompt (0..K-1)


@dataclass(frozen=True)
class LabelField:
    """How one field of Labels is stored and laid out for the loss."""

    per: str  # COMPLETION, PROMPT or STEP: what one value belongs to
    kind: str  # the reward kind whose loss reads it: scalar (attribute heads' scalar reward too), steps or attributes
    tensor: str  # its packing.SegmentLabels attribute
    dtype: type = np.float64  # its token-store column's; the tensor of a float column has the batch's float dtype
    missing: float | str = math.nan  # stored for a completion of a prompt without it (INDEX: see above)
    flag: str = ""  # the token store's (G,) bool column of which prompts carry it (fields that may be None)
    width: bool = False  # a row of numbers per value: an (S, A) column, A = 0 when no prompt carries it
    laid: str = ""  # what one tensor value belongs to, when not `per`: STEP repeats a completion's over its steps
    times: str = ""  # the Labels property that multiplies its tensor's values
    column: str = ""  # its token-store column (label_fields fills in the field's name where empty)
    name: str = ""  # the Labels field (filled in by label_fields)

    def values(self, labels: Labels, k: int, width: int = 0) -> list:
        """Its values in a prompt of k completions, flat: one per completion (`missing` where the prompt has none),
        one for the prompt, or each step of each completion in turn."""
        value = getattr(labels, self.name)
        if self.per == PROMPT:
            return [value]
        if self.per == STEP:
            return [v for steps in value or () for v in steps]
        if value:
            return list(value)
        if self.missing == INDEX:
            return list(range(k))
        return [(self.missing,) * width if self.width else self.missing] * k


def label(default: Any, **spec: Any) -> Any:
    """A Labels field with its LabelField."""
    return field(default=default, metadata={"label": LabelField(**spec)})


@dataclass(frozen=True)
class Labels:
    """What a prompt's completions are trained toward: Example and sequences.Group carry it, token_store.TokenStore
    stores it, and packing.collate lays it out per segment (packing.SegmentLabels) for the loss."""

    # per completion, 0 = best; equal ranks are ties; empty means 0..K-1; -1: unranked
    ranks: tuple[int, ...] = label((), per=COMPLETION, kind="scalar", tensor="seg_rank", dtype=np.int64, missing=INDEX)
    # scored rows: the raw scores, and the scores standardised over their file
    scores: tuple[float, ...] | None = label(None, per=COMPLETION, kind="scalar", tensor="seg_score", flag="has_scores")
    targets: tuple[float, ...] | None = label(
        None, per=COMPLETION, kind="scalar", tensor="seg_target", flag="has_targets"
    )
    margin: float = label(0.0, per=PROMPT, kind="scalar", tensor="group_margin")  # subtracted inside every pair's loss
    # the prompt's share of the loss; of the ranking loss only when it is ranked (0 for stepwise prompts)
    weight: float = label(1.0, per=PROMPT, kind="scalar", tensor="group_weight", times="ranked")
    # with data.attributes: per completion, its rating of each attribute in data.attributes' order, NaN = missing
    attributes: tuple[tuple[float, ...], ...] | None = label(
        None, per=COMPLETION, kind="attributes", tensor="seg_attributes", width=True
    )
    # stepwise groups (ranks all -1): per completion, each step's label in [0, 1] and the row's weight
    steps: tuple[tuple[float, ...], ...] | None = label(
        None, per=STEP, kind="steps", tensor="step_label", flag="has_steps", column="step_labels"
    )
    step_weights: tuple[float, ...] | None = label(
        None, per=COMPLETION, kind="steps", tensor="step_weight", flag="has_steps", laid=STEP
    )

    @property
    def ranked(self) -> bool:
        """Whether the completions are compared with each other (stepwise solutions never are)."""
        return not self.ranks or self.ranks[0] >= 0


def label_fields(cls: type[Labels]) -> tuple[LabelField, ...]:
    """The LabelFields of Labels (or of a subclass that adds fields), names filled in."""
    specs = ((f, f.metadata["label"]) for f in fields(cls))
    return tuple(replace(spec, name=f.name, column=spec.column or f.name) for f, spec in specs)


LABELS: tuple[LabelField, ...] = label_fields(Labels)


def of_kind(kind: str) -> tuple[LabelField, ...]:
    """The label fields a reward kind's loss reads."""
    return tuple(f for f in LABELS if f.kind == kind)


def step_counts(labels: Labels, k: int) -> list[int]:
    """Each of the prompt's k completions' number of steps: the length of its values of the first STEP field the
    prompt carries (0 for a prompt without steps)."""
    steps = next((v for f in LABELS if f.per == STEP and (v := getattr(labels, f.name)) is not None), None)
    return [0] * k if steps is None else [len(s) for s in steps]
