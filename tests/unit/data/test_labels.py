"""The label specification (bigrm.data.labels): every field, and one declared only there, travels Example → token
store on disk → Group → collate → SegmentLabels with its values exact, from the spec alone."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import random

import numpy as np
import pytest
import torch

from bigrm.data import labels as spec
from bigrm.data.examples import Example
from bigrm.data.labels import COMPLETION, INDEX, LABELS, PROMPT, STEP, Labels
from bigrm.data.pipeline import CACHE_FORMAT
from bigrm.data.sequences import EncodeReport, Tokenized

# the label columns a token cache of format 4 holds: changing them changes what caches hold, and CACHE_FORMAT with it
STORE_LAYOUT = (
    "tokens", "seq_offsets", "seq_starts", "group_offsets", "source_bytes", "source_offsets", "step_offsets",
    "step_index",
)  # fmt: skip
LABEL_COLUMNS = {
    "ranks": "int64", "scores": "float64", "targets": "float64", "margin": "float64", "weight": "float64",
    "attributes": "float64", "step_labels": "float64", "step_weights": "float64", "has_scores": "bool",
    "has_targets": "bool", "has_steps": "bool",
}  # fmt: skip


def fresh(name: str):
    """A new copy of a module, deriving what it derives from the label spec as it is now (sys.modules keeps the
    original: other tests see the real spec)."""
    found = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


def value(f, rng: random.Random, width: int):
    if np.issubdtype(f.dtype, np.integer):
        return rng.randrange(-1, 4)
    if f.width:
        return tuple(rng.choice([math.nan, rng.uniform(-3, 3)]) for _ in range(width))
    return rng.uniform(-3, 3)


def random_labels(cls, fields, rng: random.Random, counts: list[int], width: int):
    """A prompt's labels with every field set (by the spec alone) or, for fields with a flag, sometimes None (all
    fields of one flag together); steps only where the completions have some."""
    absent = {
        f.flag for f in fields if f.flag and (rng.random() < 0.3 or (STEP in (f.per, f.laid) and not any(counts)))
    }
    values = {}
    for f in fields:
        if (f.flag and f.flag in absent) or (f.width and not width):
            values[f.name] = None
        elif f.per == PROMPT:
            values[f.name] = value(f, rng, width)
        elif f.per == STEP:
            values[f.name] = tuple(tuple(value(f, rng, width) for _ in range(n)) for n in counts)
        elif f.missing == INDEX and rng.random() < 0.3:
            values[f.name] = ()  # means 0..K-1
        else:
            values[f.name] = tuple(value(f, rng, width) for _ in counts)
    return cls(**values)


def examples_and_tokens(cls, fields, seed: int, width: int, stepwise: bool) -> tuple[list[Example], Tokenized]:
    """Examples of random labels, and a Tokenized of them as encode_examples would give (random tokens, step ends
    at increasing positions of each sequence)."""
    rng = random.Random(seed)
    examples, lengths, counts, ends = [], [], [], []
    for g in range(12):
        k = rng.randint(1, 4)
        steps = [rng.randint(1, 3) if stepwise and g % 2 else 0 for _ in range(k)]
        lab = random_labels(cls, fields, rng, steps, width)
        steps = spec.step_counts(lab, k)  # the labels decide: no steps where their flag is off
        examples.append(Example(f"p{g}", tuple(f"c{j}" for j in range(k)), f"f:line {g}", lab))
        for n in steps:
            lengths.append(rng.randint(n + 1, 9))
            counts.append(n)
            ends += sorted(rng.sample(range(lengths[-1]), n))
    tokens = np.array([rng.randrange(5, 500) for _ in range(sum(lengths))], dtype=np.uint32)
    done = Tokenized(
        tokens, np.array(lengths, np.int64), np.zeros(len(lengths), np.int64), np.arange(len(examples)),
        EncodeReport(), [],
        np.array(counts, np.int64), np.array(ends, np.int64),
    )  # fmt: skip
    return examples, done


def expected_tensor(f, labs: list[Labels], ks: list[int], width: int) -> list:
    """A field's SegmentLabels tensor as plain values, from its meaning in the spec."""
    out = []
    for lab, k in zip(labs, ks, strict=True):
        got = f.values(lab, k, width)
        if f.laid == STEP:
            got = [v for v, n in zip(got, spec.step_counts(lab, k), strict=True) for _ in range(n)]
        out += [v * getattr(lab, f.times) for v in got] if f.times else got
    return out


def check_round_trip(tmp_path, token_store, packing, cls, fields, width: int, stepwise: bool) -> None:
    examples, done = examples_and_tokens(cls, fields, seed=width + 2 * stepwise, width=width, stepwise=stepwise)
    token_store.TokenStore.of(done, examples, width).save(tmp_path / "store")
    store = token_store.TokenStore.load(tmp_path / "store")
    for f in fields:
        assert np.load(tmp_path / "store" / f"{f.column}.npy").dtype == np.dtype(f.dtype), f.name
        if f.flag:
            assert (tmp_path / "store" / f"{f.flag}.npy").is_file()
    groups = list(token_store.concat([store, store]))  # the second copy's offsets shifted, values kept
    examples = examples * 2
    for group, e in zip(groups, examples, strict=True):
        k = len(e.completions)
        filled = {f.name: tuple(range(k)) for f in fields if f.missing == INDEX and not getattr(e.labels, f.name)}
        assert repr(group.labels) == repr(dataclasses.replace(e.labels, **filled))  # repr: NaN equals NaN
        assert type(group.labels) is cls and group.source == e.source
        assert (group.steps is None) == (spec.step_counts(e.labels, len(e.completions)) == [0] * len(e.completions))
    ks = [len(e.completions) for e in examples]
    labels = [e.labels for e in examples]
    for share_prompt in (False, True):
        batch = packing.collate(groups, pad_id=0, share_prompt=share_prompt).labels
        for f in fields:
            want, got = expected_tensor(f, labels, ks, width), getattr(batch, f.tensor)
            if got is None:
                assert not want or (f.width and not width), f.name
                continue
            want = torch.tensor(want, dtype=got.dtype).reshape(got.shape)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=f.name)
            assert got.dtype == (torch.long if np.issubdtype(f.dtype, np.integer) else torch.float32), f.name


@pytest.mark.parametrize("width,stepwise", [(0, False), (3, False), (0, True)])
def test_every_label_field_survives_the_store_and_reaches_its_tensor(tmp_path, width, stepwise):
    from bigrm.data import packing, token_store

    check_round_trip(tmp_path, token_store, packing, Labels, LABELS, width, stepwise)


def test_a_label_declared_only_in_the_spec_reaches_the_store_and_the_batch(tmp_path, monkeypatch):
    """Two new fields, each one Labels field with its LabelField: the token store gains their columns (and flag) and
    SegmentLabels their tensors, with no other change."""

    @dataclasses.dataclass(frozen=True)
    class Extended(Labels):
        novelty: tuple[float, ...] | None = spec.label(
            None, per=COMPLETION, kind="novelty", tensor="seg_novelty", flag="has_novelty"
        )
        level: int = spec.label(0, per=PROMPT, kind="novelty", tensor="group_level", dtype=np.int64)

    extended = spec.label_fields(Extended)
    monkeypatch.setattr(spec, "Labels", Extended)
    monkeypatch.setattr(spec, "LABELS", extended)
    token_store, packing = fresh("bigrm.data.token_store"), fresh("bigrm.data.packing")
    assert {"novelty", "has_novelty", "level"} <= set(token_store.ARRAYS)
    assert {"seg_novelty", "group_level"} <= {f.name for f in dataclasses.fields(packing.SegmentLabels)}
    assert [f.name for f in spec.of_kind("novelty")] == ["novelty", "level"]
    check_round_trip(tmp_path, token_store, packing, Extended, extended, 2, True)


def test_the_store_format_is_pinned():
    """Changing the label spec or the store's layout changes what token caches hold: pipeline.CACHE_FORMAT must rise
    with it."""
    from bigrm.data.token_store import ARRAYS, FLAGS, LAYOUT

    dtypes = {f.column: np.dtype(f.dtype).name for f in LABELS} | dict.fromkeys(FLAGS, "bool")
    pinned = (6, STORE_LAYOUT, LABEL_COLUMNS)
    assert (CACHE_FORMAT, LAYOUT, dtypes) == pinned, "raise pipeline.CACHE_FORMAT, then update what is pinned here"
    assert ARRAYS == LAYOUT + tuple(dtypes)


def test_each_field_is_declared_coherently():
    """Tensor and column names are unique; fields a prompt may lack are optional in Labels and flagged (rated ones
    are absent as a 0-wide column); a STEP field has a flag (most prompts have no steps)."""
    assert len({f.tensor for f in LABELS}) == len({f.column for f in LABELS}) == len(LABELS)
    for f, field in zip(LABELS, dataclasses.fields(Labels), strict=True):
        assert f.per in (COMPLETION, PROMPT, STEP) and f.laid in ("", STEP), f.name
        assert (field.default is None) == bool(f.flag or f.width), f.name
        assert f.per != STEP or f.flag, f.name
