"""Rows are validated against their raw JSON types, each row on its own (bigrm.data.rows through load_examples and
read_file, the readers training and scoring use), and reading leaves nothing in `datasets`' own cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigrm.config import DataConfig
from bigrm.data.rows import load_examples, read_file
from bigrm.errors import ConfigError, DataError

PAIR = {"prompt": "p", "chosen": "yes", "rejected": "no"}
SCORED = {"prompt": "p", "completions": ["a", "b"], "scores": [1, 2]}
STEPS = {"prompt": "p", "completions": ["s1", "s2"], "labels": [True, False]}
RATED = {"prompt": "p", "response": "r", "help": 3}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """`datasets`' own cache, pointed at an empty folder the tests check stays untouched."""
    import datasets

    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
    return cache


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def errors_of(path: str, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_examples([path], DataConfig(**kw))
    return str(info.value)


# the odd row comes second: the first row's types are what a typing reader would convert it to
@pytest.mark.parametrize(
    ("good", "odd", "kw", "expected"),
    [
        (SCORED, dict(SCORED, scores=[1, "2"]), {}, "field 'scores[1]': must be a finite number"),
        (PAIR, dict(PAIR, weight="2"), {}, "field 'weight': must be a positive number"),
        (PAIR, dict(PAIR, margin="0.5"), {}, "field 'margin': must be a number"),
        (dict(PAIR, margin=1.0), dict(PAIR, margin="0.5"), {}, "field 'margin': must be a number"),
        (STEPS, dict(STEPS, labels=[True, "true"]), {}, "field 'labels[1]': must be a boolean or a probability"),
        (STEPS, dict(STEPS, labels=[1, "0.3"]), {}, "field 'labels[1]': must be a boolean or a probability"),
        (RATED, dict(RATED, help="3"), {"attributes": ["help"]}, "field 'help': must be a number"),
        (
            dict(PAIR, help=[1, 2]),
            dict(PAIR, help=[1, "2"]),
            {"attributes": ["help"]},
            "field 'help[1]': must be a number",
        ),
    ],
)
def test_numeric_and_boolean_strings_are_errors_not_converted(tmp_path, good, odd, kw, expected):
    path = jsonl(tmp_path / "rows.jsonl", [good, odd])
    message = errors_of(path, **kw)
    assert message.startswith("1 invalid row(s)") and f"{path}:line 2: {expected}" in message


def test_nan_and_infinity_step_labels_are_reported_as_written(tmp_path):
    path = tmp_path / "nan.jsonl"
    path.write_text(json.dumps(STEPS) + '\n{"prompt": "q", "completions": ["a", "b"], "labels": [NaN, Infinity]}\n')
    assert f"{path}:line 2: field 'labels[0]': must be a boolean or a probability in [0, 1], got nan" in errors_of(
        str(path)
    )


def test_one_row_of_another_format_is_that_rows_error(tmp_path):
    odd = {"prompt": "q", "ranked_outputs": ["c", "d"]}
    path = jsonl(tmp_path / "mixed.jsonl", [PAIR, dict(PAIR, prompt="p2"), odd])
    message = errors_of(path)
    assert message.startswith("1 invalid row(s)")
    assert f"{path}:line 3: field 'chosen': missing (its columns ['prompt', 'ranked_outputs'] make it a ranked row" in (
        message
    )
    per_file, report = load_examples([path], DataConfig(skip_invalid=True))
    assert [e.prompt for e in per_file[0]] == ["p", "p2"] and report.rows == 3


def test_one_ranked_row_among_pairs_in_parquet_is_that_rows_error(tmp_path):
    """Arrow gives every row every column (null where absent): null counts as absent for the row's format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mixed.parquet"
    odd = {"prompt": "q", "ranked_outputs": ["c", "d"]}
    rows = [PAIR, dict(PAIR, prompt="p2"), odd]
    columns = dict.fromkeys(k for row in rows for k in row)  # from_pylist would keep only the first row's columns
    pq.write_table(pa.table({k: [row.get(k) for row in rows] for k in columns}), path)
    message = errors_of(str(path))
    assert message.startswith("1 invalid row(s)") and f"{path}:row 2: field 'chosen': missing (its columns" in message


def test_a_row_with_another_formats_columns_too_is_refused_even_if_it_parses(tmp_path):
    both = dict(PAIR, ranked_outputs=["c", "d"])
    path = jsonl(tmp_path / "both.jsonl", [PAIR, PAIR | {"prompt": "p2"}, both])
    assert f"{path}:line 3: field '<row>': its columns" in errors_of(path)


def test_the_first_row_does_not_decide_the_format(tmp_path):
    path = jsonl(tmp_path / "first_odd.jsonl", [{"prompt": "q", "ranked_outputs": ["c", "d"]}, PAIR, PAIR])
    assert read_file(path, DataConfig()).fmt == "pairwise"


def test_rows_keep_only_their_own_fields(tmp_path):
    # a typing reader gives every row every column of the file (null where absent) and unifies message keys
    chat = {"prompt": [{"role": "user", "content": "q", "name": "x"}], "chosen": "a", "rejected": "b"}
    plain = {"prompt": [{"role": "user", "content": "q2"}], "chosen": "a", "rejected": "b", "margin": 0.5}
    path = jsonl(tmp_path / "own.jsonl", [chat, plain])
    assert read_file(path, DataConfig()).rows == [chat, plain]


def test_only_newline_ends_a_json_lines_row(tmp_path):
    # str.splitlines also splits at U+2028, U+0085 and \x1c, which JSON writers leave unescaped inside strings
    rows = [dict(PAIR, chosen="a\u2028b"), dict(PAIR, chosen="c\x85d\x1ce")]
    path = jsonl(tmp_path / "seps.jsonl", rows)
    file = read_file(path, DataConfig())
    assert file.rows == rows and [file.locate(i) for i in range(2)] == [f"{path}:line 1", f"{path}:line 2"]


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(PAIR).encode() + b"\n")
    assert read_file(str(path), DataConfig()).rows == [PAIR]


@pytest.mark.parametrize("ratings", [[0, 4], [-1, 2]])
def test_attribute_range_is_checked_with_file_and_line(tmp_path, ratings):
    rows = [dict(RATED, help=2), dict(RATED, help=ratings[1] if ratings[0] == 0 else ratings[0])]
    rows.append(dict(PAIR, help=[1, ratings[0]]))
    path = jsonl(tmp_path / "rated.jsonl", rows)
    kw = {"attributes": ["help"], "attribute_range": [0.0, 3.0]}
    message = errors_of(path, **kw, skip_invalid=False)
    outside = ratings[1] if ratings[0] == 0 else ratings[0]
    assert f"{path}:line 2: field 'help': must be within data.attribute_range [0.0, 3.0], got {outside}" in message
    # unchecked without a declared range
    per_file, _ = load_examples([jsonl(tmp_path / "ok.jsonl", rows[:2])], DataConfig(attributes=["help"]))
    assert len(per_file[0]) == 2


@pytest.mark.parametrize("bounds", [[1.0], [2.0, 1.0], [0.0, float("inf")], [0.0, 1.0, 2.0]])
def test_attribute_range_must_be_lo_below_hi(bounds):
    with pytest.raises(ConfigError, match="data.attribute_range"):
        DataConfig(attributes=["help"], attribute_range=bounds)


@pytest.mark.parametrize("kind", ["parquet", "dir", "jsonl"])
def test_reading_leaves_datasets_cache_untouched(tmp_path, _datasets_cache, kind):
    import datasets

    rows = [PAIR, dict(PAIR, prompt="p2")]
    path = tmp_path / f"rows.{kind}"
    if kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "dir":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        jsonl(path, rows)
    assert read_file(str(path), DataConfig()).rows == rows
    assert not _datasets_cache.exists() or not any(_datasets_cache.iterdir())
