"""Rows → validated examples (bigrm.data.rows), through real files written to tmp_path."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from bigrm.config import DataConfig
from bigrm.data.examples import Example
from bigrm.data.rows import file_specs, load_examples, load_file, mix, parse_row, read_rows
from bigrm.errors import DataError

REAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
MARKER = "\n\nAssistant:"


@pytest.fixture(autouse=True, scope="module")
def _private_datasets_cache(tmp_path_factory):
    """Keep `datasets`' JSON/Parquet cache out of the user's ~/.cache, and stop `load_dataset` from sending its
    download-count request (a network call with a 3 s timeout per file) while these tests run."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        mp.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
        yield


# ---------------------------------------------------------------------------------------------------- helpers


def write_lines(path: Path, lines: list) -> str:
    """A JSON Lines file: dict/list items are dumped as JSON, str items are written verbatim (\"\" = blank line)."""
    text = "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def load_one(path: str, **kw) -> list[Example]:
    per_file, report = load_examples([path], DataConfig(**kw))
    assert len(per_file) == 1
    return per_file[0]


def load_error(path: str | list[str], **kw) -> str:
    with pytest.raises(DataError) as info:
        load_examples([path] if isinstance(path, str) else path, DataConfig(**kw))
    return str(info.value)


def msgs(*pairs: str) -> list[dict]:
    """msgs("user", "hi", "assistant", "hello") → chat messages."""
    return [{"role": r, "content": c} for r, c in zip(pairs[::2], pairs[1::2], strict=True)]


# ---------------------------------------------------------------------------------------------------- row formats


def test_ranked_rows_with_k_from_2_to_5(tmp_path):
    rows = [{"prompt": f"prompt {k}", "ranked_outputs": [f"answer {k}.{i}" for i in range(k)]} for k in (2, 3, 4, 5)]
    path = write_lines(tmp_path / "ranked.jsonl", rows)
    examples = load_one(path)
    assert [len(e.completions) for e in examples] == [2, 3, 4, 5]
    for i, (ex, row) in enumerate(zip(examples, rows, strict=True)):
        assert ex.prompt == row["prompt"]
        assert ex.completions == tuple(row["ranked_outputs"])  # best first, order kept
        assert ex.labels.margin == 0.0
        assert ex.source == f"{path}:line {i + 1}"


def test_pairwise_rows_with_prompt(tmp_path):
    rows = [
        {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
        {"prompt": "Q: capital of France?", "chosen": " Paris", "rejected": " Lyon"},
    ]
    examples = load_one(write_lines(tmp_path / "pairs.jsonl", rows))
    assert [(e.prompt, e.completions) for e in examples] == [
        ("Q: 2+2?", (" 4", " 5")),
        ("Q: capital of France?", (" Paris", " Lyon")),
    ]


def test_implicit_prompt_hh_style_cuts_after_last_assistant_marker(tmp_path):
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"
    rows = [
        # both answers start with the same words: the prompt still ends at the marker, not at the common prefix
        {"chosen": shared + " I think it is 4.", "rejected": shared + " I think it is 5."},
        # single turn
        {
            "chosen": "\n\nHuman: Name a colour\n\nAssistant: Blue",
            "rejected": "\n\nHuman: Name a colour\n\nAssistant: Red",
        },
        # the conversations diverge at an earlier Human turn: cut after the last marker *inside* the common prefix
        {
            "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
            "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: x\n\nAssistant: y",
        },
    ]
    examples = load_one(write_lines(tmp_path / "hh.jsonl", rows))
    assert examples[0].prompt == shared
    assert examples[0].completions == (" I think it is 4.", " I think it is 5.")
    assert examples[1].prompt == "\n\nHuman: Name a colour\n\nAssistant:"
    assert examples[1].completions == (" Blue", " Red")
    assert examples[2].prompt == "\n\nHuman: a\n\nAssistant:"
    assert examples[2].completions == (" b\n\nHuman: c\n\nAssistant: d", " b\n\nHuman: x\n\nAssistant: y")
    for ex, row in zip(examples, rows, strict=True):
        assert ex.prompt + ex.completions[0] == row["chosen"]
        assert ex.prompt + ex.completions[1] == row["rejected"]


def test_implicit_prompt_without_marker_is_longest_common_prefix(tmp_path):
    rows = [
        {"chosen": "The sky is blue today", "rejected": "The sky is grey today"},
        # only part of the marker is shared: no full marker in the common prefix → whole common prefix
        {"chosen": "Q\n\nAssistant: yes", "rejected": "Q\n\nAssistant? no"},
    ]
    examples = load_one(write_lines(tmp_path / "lcp.jsonl", rows))
    assert (examples[0].prompt, examples[0].completions) == ("The sky is ", ("blue today", "grey today"))
    assert (examples[1].prompt, examples[1].completions) == ("Q\n\nAssistant", (": yes", "? no"))


@pytest.mark.parametrize(
    ("marker", "prompt"),
    [("", "User: hi\nBot: I "), ("\nBot:", "User: hi\nBot:"), ("<never>", "User: hi\nBot: I ")],
)
def test_assistant_marker_is_configurable(tmp_path, marker, prompt):
    row = {"chosen": "User: hi\nBot: I am fine", "rejected": "User: hi\nBot: I do not know"}
    (ex,) = load_one(write_lines(tmp_path / "m.jsonl", [row]), assistant_marker=marker)
    assert ex.prompt == prompt
    assert ex.completions == (row["chosen"][len(prompt) :], row["rejected"][len(prompt) :])


def test_conversational_prompt_with_string_completions(tmp_path):
    prompt = msgs("system", "Be brief.", "user", "2+2?")
    rows = [
        {"prompt": prompt, "chosen": "4", "rejected": "5"},
        {"prompt": prompt, "ranked_outputs": ["4", "four", "5"]},
    ]
    pair = load_one(write_lines(tmp_path / "chat_pairs.jsonl", rows[:1]))[0]
    assert pair.prompt == prompt
    assert pair.completions == ("4", "5")
    ranked = load_one(write_lines(tmp_path / "chat_ranked.jsonl", rows[1:]))[0]
    assert ranked.prompt == prompt
    assert ranked.completions == ("4", "four", "5")


def test_implicit_chat_pairs_share_leading_messages(tmp_path):
    head = msgs("user", "Hi", "assistant", "Hello! How can I help?", "user", "Tell me a joke")
    rows = [
        {
            "chosen": head + msgs("assistant", "Why did the chicken cross the road?"),
            "rejected": head + msgs("assistant", "No."),
        },
        # divergence at a user turn: the completion is the rest of the conversation
        {
            "chosen": msgs("user", "Hi", "assistant", "Hey", "user", "Thanks", "assistant", "Welcome"),
            "rejected": msgs("user", "Hi", "assistant", "Hey", "user", "Bye", "assistant", "Bye!"),
        },
    ]
    examples = load_one(write_lines(tmp_path / "chat_implicit.jsonl", rows))
    assert examples[0].prompt == head
    assert examples[0].completions == (
        msgs("assistant", "Why did the chicken cross the road?"),
        msgs("assistant", "No."),
    )
    assert examples[1].prompt == msgs("user", "Hi", "assistant", "Hey")
    assert examples[1].completions == (
        msgs("user", "Thanks", "assistant", "Welcome"),
        msgs("user", "Bye", "assistant", "Bye!"),
    )


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            {"chosen": msgs("user", "a", "assistant", "b"), "rejected": msgs("user", "x", "assistant", "y")},
            "share no prompt messages",
        ),
        (
            {"chosen": msgs("user", "a", "assistant", "b"), "rejected": msgs("user", "a")},
            "one conversation is a prefix of the other",
        ),
        (
            {"chosen": msgs("user", "a", "assistant", "b"), "rejected": "user a assistant c"},
            "both be text or both be chat messages",
        ),
        ({"chosen": "Yes please", "rejected": "No thanks"}, "share no prefix"),
    ],
)
def test_implicit_pairs_that_cannot_be_split(tmp_path, row, reason):
    path = write_lines(tmp_path / "bad_implicit.jsonl", [row])
    message = load_error(path)
    assert f"{path}:line 1: field 'chosen/rejected': " in message
    assert reason in message


def test_chat_completions_need_a_chat_prompt(tmp_path):
    row = {"prompt": "plain text", "chosen": msgs("assistant", "a"), "rejected": msgs("assistant", "b")}
    path = write_lines(tmp_path / "mixed.jsonl", [row])
    assert f"{path}:line 1: field 'chosen': chat-message completions need a chat-message prompt" in load_error(path)


def test_configurable_column_names(tmp_path):
    ranked = write_lines(tmp_path / "r.jsonl", [{"question": "q", "responses": ["a", "b", "c"], "gap": 0.5}])
    (ex,) = load_one(ranked, prompt_column="question", ranked_column="responses", margin_column="gap")
    assert (ex.prompt, ex.completions, ex.labels.margin) == ("q", ("a", "b", "c"), 0.5)

    pairs = write_lines(tmp_path / "p.jsonl", [{"prompt": "q", "good": "a", "bad": "b"}])
    (ex,) = load_one(pairs, chosen_column="good", rejected_column="bad")
    assert (ex.prompt, ex.completions) == ("q", ("a", "b"))

    implicit = write_lines(tmp_path / "i.jsonl", [{"good": "Q\n\nAssistant: a", "bad": "Q\n\nAssistant: b"}])
    (ex,) = load_one(implicit, chosen_column="good", rejected_column="bad")
    assert (ex.prompt, ex.completions) == ("Q\n\nAssistant:", (" a", " b"))

    # with the default names these files have no recognisable format
    assert "cannot tell the format" in load_error(pairs)


def test_margin_column(tmp_path):
    rows = [
        {"prompt": "p1", "chosen": "a", "rejected": "b", "margin": 2},
        {"prompt": "p2", "chosen": "a", "rejected": "b", "margin": 0.25},
        {"prompt": "p3", "chosen": "a", "rejected": "b", "margin": None},
        {"prompt": "p4", "chosen": "a", "rejected": "b"},
        {"prompt": "p5", "chosen": "a", "rejected": "b", "margin": -1.5},
    ]
    examples = load_one(write_lines(tmp_path / "margin.jsonl", rows))
    assert [e.labels.margin for e in examples] == [2.0, 0.25, 0.0, 0.0, -1.5]
    assert all(isinstance(e.labels.margin, float) for e in examples)


# ---------------------------------------------------------------------------------------------------- file types

ROWS = [
    {"prompt": "first", "ranked_outputs": ["a", "b", "c"], "margin": 0.5},
    {"prompt": "second", "ranked_outputs": ["d", "e"], "margin": None},
    {"prompt": "third", "ranked_outputs": ["f", "g", "h", "i"], "margin": 1.0},
]


def _write_json_array(path: Path, rows: list) -> str:
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return str(path)


def _write_parquet(path: Path, rows: list) -> str:
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def _write_dir(path: Path, rows: list) -> str:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


WRITERS = {
    "data.jsonl": write_lines,
    "data.jsonl.gz": write_lines,
    "data.json": _write_json_array,
    "data.parquet": _write_parquet,
    "saved_dataset": _write_dir,
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_file_type_gives_the_same_examples(tmp_path, name):
    path = WRITERS[name](tmp_path / name, ROWS)
    assert read_rows(path) == ROWS
    examples, errors, n = load_file(path, DataConfig())
    assert (errors, n) == ([], 3)
    assert [(e.prompt, e.completions, e.labels.margin) for e in examples] == [
        ("first", ("a", "b", "c"), 0.5),
        ("second", ("d", "e"), 0.0),
        ("third", ("f", "g", "h", "i"), 1.0),
    ]
    if "jsonl" in name:
        assert [e.source for e in examples] == [f"{path}:line {i}" for i in (1, 2, 3)]
    else:
        assert [e.source for e in examples] == [f"{path}:row {i}" for i in (0, 1, 2)]


@pytest.mark.parametrize("name", ["bad.jsonl.gz", "bad.parquet", "bad_dir"])
def test_row_errors_are_located_in_every_file_type(tmp_path, name):
    rows = [dict(r) for r in ROWS]
    rows[2]["ranked_outputs"] = ["f", "f"]
    path = (write_lines if name.endswith(".gz") else _write_parquet if name.endswith(".parquet") else _write_dir)(
        tmp_path / name, rows
    )
    where = f"{path}:line 3" if name.endswith(".gz") else f"{path}:row 2"
    assert f"{where}: field 'ranked_outputs[1]': duplicate of ranked_outputs[0]" in load_error(path)


def test_blank_lines_are_not_rows_but_count_as_lines(tmp_path):
    path = write_lines(tmp_path / "blanks.jsonl", ["", ROWS[0], "", "   ", ROWS[1], ROWS[2], ""])
    examples = load_one(path)
    assert [e.prompt for e in examples] == ["first", "second", "third"]
    assert [e.source for e in examples] == [f"{path}:line {i}" for i in (2, 5, 6)]


# ---------------------------------------------------------------------------------------------------- errors

GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}
GOOD_RANKED = {"prompt": "p", "ranked_outputs": ["a", "b", "c"]}
GOOD_CHAT = {"prompt": msgs("user", "q"), "chosen": "a", "rejected": "b"}
GOOD_CHAT_MSGS = {"prompt": msgs("user", "q"), "chosen": msgs("assistant", "a"), "rejected": msgs("assistant", "b")}


@pytest.mark.parametrize(
    ("bad", "first", "expected"),
    [
        ({"prompt": "p", "chosen": "yes"}, GOOD, "field 'rejected': missing"),
        ({"prompt": None, "chosen": "yes", "rejected": "no"}, GOOD, "field 'prompt': missing"),
        ({"chosen": "yes", "rejected": "no"}, GOOD, "field 'prompt': missing"),
        ({"prompt": "p"}, GOOD_RANKED, "field 'ranked_outputs': missing"),
        (
            {"prompt": "p", "ranked_outputs": ["only"]},
            GOOD_RANKED,
            "field 'ranked_outputs': needs at least 2 completions, got 1",
        ),
        (
            {"prompt": "p", "ranked_outputs": []},
            GOOD_RANKED,
            "field 'ranked_outputs': needs at least 2 completions, got 0",
        ),
        ({"prompt": "p", "chosen": "", "rejected": "no"}, GOOD, "field 'chosen': empty completion"),
        ({"prompt": "p", "chosen": "yes", "rejected": " \n\t "}, GOOD, "field 'rejected': empty completion"),
        ({"prompt": "p", "ranked_outputs": ["a", "", "c"]}, GOOD_RANKED, "field 'ranked_outputs[1]': empty completion"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, GOOD, "field 'rejected': duplicate of chosen"),
        (
            {"prompt": "p", "ranked_outputs": ["a", "b", "a"]},
            GOOD_RANKED,
            "field 'ranked_outputs[2]': duplicate of ranked_outputs[0] under the same prompt",
        ),
        (
            {"prompt": "p", "chosen": "yes", "rejected": "no", "margin": "big"},
            GOOD,
            "field 'margin': must be a number within float32's range, got 'big'",
        ),
        (
            {"prompt": "p", "chosen": "yes", "rejected": "no", "margin": True},
            GOOD,
            "field 'margin': must be a number within float32's range, got True",
        ),
        (
            {"prompt": msgs("user", "hi", "assistant", "  "), "chosen": "a", "rejected": "b"},
            GOOD_CHAT,
            "field 'prompt': message 1 has empty content",
        ),
        (
            {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
            GOOD_CHAT,
            "field 'prompt': message 0 needs string 'role' and 'content'",
        ),
        (
            {"prompt": msgs("user", "q"), "chosen": msgs("assistant", ""), "rejected": msgs("assistant", "b")},
            GOOD_CHAT_MSGS,
            "field 'chosen': message 0 has empty content",
        ),
    ],
)
def test_row_error_names_file_physical_line_and_field(tmp_path, bad, first, expected):
    # blank lines before the bad row: the reported line is the physical 1-based line (here 5), not the row index
    path = write_lines(tmp_path / "rows.jsonl", ["", first, "", "", bad, first])
    message = load_error(path)
    assert message.startswith("1 invalid row(s) (set data.skip_invalid: true to skip them):")
    assert f"{path}:line 5: {expected}" in message
    assert f"{path}:line 2" not in message and f"{path}:line 6" not in message


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            [{"prompt": "p", "chosen": 5, "rejected": "no"}],
            "field 'chosen': must be a non-empty string or a list of chat messages, got int",
        ),
        (
            [{"prompt": "p", "ranked_outputs": [1, 2]}],
            "field 'ranked_outputs[0]': must be a non-empty string or a list of chat messages, got int",
        ),
        ([{"prompt": "p", "ranked_outputs": "a b"}], "field 'ranked_outputs': must be a list, got str"),
        ([{"prompt": 3, "chosen": "a", "rejected": "b"}], "field 'prompt': must be text or chat messages, got int"),
    ],
)
def test_non_string_completions_and_prompts(tmp_path, rows, expected):
    path = write_lines(tmp_path / "types.jsonl", rows)
    assert f"{path}:line 1: {expected}" in load_error(path)


def test_nan_margin_is_rejected(tmp_path):
    # JSON has no NaN; Parquet does
    path = _write_parquet(tmp_path / "nan.parquet", [dict(GOOD, margin=1.0), dict(GOOD, margin=math.nan)])
    assert f"{path}:row 1: field 'margin': must be a number within float32's range, got nan" in load_error(path)


@pytest.mark.parametrize(
    ("lines", "line", "kind"),
    [(["[1, 2]", GOOD], 1, "list"), ([GOOD, "", "[1, 2]"], 3, "list"), ([GOOD, '"text"'], 2, "str")],
)
def test_row_that_is_not_an_object_is_pinpointed(tmp_path, lines, line, kind):
    path = write_lines(tmp_path / "not_object.jsonl", ["", *lines])
    with pytest.raises(DataError) as info:
        load_file(path, DataConfig())
    assert str(info.value) == f"{path}:line {line + 1}: the row is a {kind}, not a JSON object"


def test_jsonl_made_only_of_an_array_line_is_refused(tmp_path):
    # `datasets` reads a file starting with "[" as a JSON array of values (a "text" column); it is still refused
    path = write_lines(tmp_path / "array_line.jsonl", ["[1, 2]"])
    message = load_error(path)
    assert message.startswith(f"{path}: ")


def test_parse_row_rejects_a_non_object_row():
    err = parse_row(["a", "b"], "pairwise", DataConfig(), "f.jsonl:line 7")
    assert str(err) == "f.jsonl:line 7: field '<row>': the row is a list, not an object"


def test_invalid_json_line_is_pinpointed(tmp_path):
    path = write_lines(tmp_path / "broken.jsonl.gz", [GOOD, "", '{"prompt": "p", "chosen": '])
    with pytest.raises(DataError) as info:
        load_file(path, DataConfig())
    assert str(info.value).startswith(f"{path}:line 3: not valid JSON")


@pytest.mark.parametrize("blank", [False, True])
@pytest.mark.parametrize(
    ("field", "other"), [("prompt", ["a", "list"]), ("chosen", 7), ("ranked_outputs", "not a list")]
)
def test_type_clash_between_rows_names_line_and_field(tmp_path, blank, field, other):
    """A field that is a string on one line and something else on another: depending on the `datasets`
    version and the file's layout, Arrow refuses the file (then the first clashing line is pinpointed) or it
    loads and the row is refused; either way the message names the file, the clashing line and the field."""
    first = GOOD_RANKED if field == "ranked_outputs" else GOOD
    bad = dict(first, **{field: other})
    lines = [first, "", bad] if blank else [first, bad]
    path = write_lines(tmp_path / "clash.jsonl", lines)
    message = load_error(path)
    line = 3 if blank else 2
    assert f"{path}:line {line}: field {field!r}" in message


def test_unknown_format_lists_the_columns(tmp_path):
    path = write_lines(tmp_path / "cols.jsonl", [{"question": "q", "answer": "a"}])
    message = load_error(path)
    assert message.startswith(f"{path}: cannot tell the format from columns ['answer', 'question']")
    assert "'ranked_outputs'" in message and "'chosen'" in message and "'rejected'" in message


def test_only_chosen_is_not_a_format(tmp_path):
    path = write_lines(tmp_path / "half.jsonl", [{"prompt": "q", "chosen": "a"}])
    assert load_error(path).startswith(f"{path}: cannot tell the format")


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    assert load_error(path) == f"{path}: no such file or directory"


@pytest.mark.parametrize("name", ["data.csv", "data.txt", "data.gz", "data"])
def test_unknown_file_type(tmp_path, name):
    path = tmp_path / name
    path.write_text(json.dumps(GOOD) + "\n")
    message = load_error(str(path))
    assert message.startswith(f"{path}: unknown file type")


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"definitely not parquet")
    assert load_error(str(path)).startswith(f"{path}: cannot be read as Parquet")


def test_a_missing_file_among_good_ones_stops_loading(tmp_path):
    good = write_lines(tmp_path / "good.jsonl", [GOOD])
    missing = str(tmp_path / "missing.parquet")
    assert load_error([good, missing]) == f"{missing}: no such file or directory"


# ---------------------------------------------------------------------------------------------------- all errors / skip


def _many_bad_rows(tmp_path) -> tuple[str, list[str]]:
    lines = [
        GOOD,  # 1
        {"prompt": "p", "chosen": "", "rejected": "no"},  # 2
        "",  # 3
        {"prompt": "p", "chosen": "x", "rejected": "x"},  # 4
        GOOD,  # 5
        {"prompt": "p", "chosen": "yes", "rejected": None},  # 6
        {"prompt": "p", "chosen": "yes", "rejected": "no", "margin": "m"},  # 7
        {"prompt": "p", "chosen": "   ", "rejected": "no"},  # 8
        GOOD,  # 9
    ]
    path = write_lines(tmp_path / "many.jsonl", lines)
    expected = [
        f"{path}:line 2: field 'chosen': empty completion",
        f"{path}:line 4: field 'rejected': duplicate of chosen under the same prompt",
        f"{path}:line 6: field 'rejected': missing",
        f"{path}:line 7: field 'margin': must be a number within float32's range, got 'm'",
        f"{path}:line 8: field 'chosen': empty completion",
    ]
    return path, expected


def test_default_stops_listing_every_error(tmp_path):
    path, expected = _many_bad_rows(tmp_path)
    message = load_error(path)
    lines = message.split("\n")
    assert lines[0] == "5 invalid row(s) (set data.skip_invalid: true to skip them):"
    assert [line.strip() for line in lines[1:]] == expected
    assert "more" not in message


def test_errors_are_capped_by_max_errors(tmp_path):
    path, expected = _many_bad_rows(tmp_path)
    lines = load_error(path, max_errors=3).split("\n")
    assert lines[0].startswith("5 invalid row(s)")
    assert [line.strip() for line in lines[1:]] == [*expected[:3], "... and 2 more"]


def test_errors_of_every_file_are_listed_together(tmp_path):
    path, expected = _many_bad_rows(tmp_path)
    other = write_lines(tmp_path / "other.jsonl", [{"prompt": "q", "ranked_outputs": ["a"]}])
    lines = load_error([path, other]).split("\n")
    assert lines[0].startswith("6 invalid row(s)")
    assert [line.strip() for line in lines[1:]] == [
        *expected,
        f"{other}:line 1: field 'ranked_outputs': needs at least 2 completions, got 1",
    ]


def test_skip_invalid_skips_and_counts_by_reason(tmp_path):
    path, _ = _many_bad_rows(tmp_path)
    other = write_lines(tmp_path / "other.jsonl", [{"prompt": "q", "ranked_outputs": ["a"]}, GOOD_RANKED])
    per_file, report = load_examples([path, other], DataConfig(skip_invalid=True))
    assert [e.source for e in per_file[0]] == [f"{path}:line {n}" for n in (1, 5, 9)]
    assert [e.source for e in per_file[1]] == [f"{other}:line 2"]
    assert report.rows == 10
    assert report.skipped == Counter(
        {
            "chosen: empty completion": 2,
            "rejected: duplicate of chosen under the same prompt": 1,
            "rejected: missing": 1,
            "margin: must be a number within float32's range, got 'm'": 1,
            "ranked_outputs: needs at least 2 completions, got 1": 1,
        }
    )
    summary = report.summary()
    assert summary.startswith("10 rows read, 6 skipped (2 × chosen: empty completion; ")
    assert "1 × rejected: missing" in summary


def test_clean_load_report(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl", [GOOD, dict(GOOD, margin=1)])
    per_file, report = load_examples([path], DataConfig(skip_invalid=True))
    assert report.rows == 2 and sum(report.skipped.values()) == 0
    assert report.summary() == "2 rows read, 0 skipped"
    assert len(per_file[0]) == 2


def test_skip_invalid_does_not_hide_file_level_errors(tmp_path):
    path = write_lines(tmp_path / "cols.jsonl", [{"question": "q"}])
    assert "cannot tell the format" in load_error(path, skip_invalid=True)
    assert "no such file" in load_error(str(tmp_path / "gone.jsonl"), skip_invalid=True)


# ---------------------------------------------------------------------------------------------------- file_specs / mix


def test_file_specs():
    assert file_specs(
        ["a.jsonl", {"path": "b.parquet", "weight": 2}, {"path": "c.json"}, {"path": "d", "weight": 0.5}]
    ) == [
        ("a.jsonl", 1.0),
        ("b.parquet", 2.0),
        ("c.json", 1.0),
        ("d", 0.5),
    ]
    assert file_specs([]) == []


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"path": "a", "weight": 0}, "weight of a must be a positive number"),
        ({"path": "a", "weight": -1.0}, "weight of a must be a positive number"),
        ({"path": "a", "weight": True}, "weight of a must be a positive number"),
        ({"path": "a", "weight": "2"}, "weight of a must be a positive number"),
        ({"path": "a", "weight": 1, "seed": 3}, "is neither a path nor a {path, weight} mapping"),
        ({"weight": 1}, "is neither a path nor a {path, weight} mapping"),
        (3, "3 is neither a path nor a {path, weight} mapping"),
    ],
)
def test_file_specs_errors(entry, expected):
    with pytest.raises(DataError, match="^data.train_files: ") as info:
        file_specs(["ok.jsonl", entry])
    assert expected in str(info.value)


def test_mix_whole_weights_repeat_every_item():
    a, b = list(range(10)), list(range(100, 107))
    assert mix([a, b], [1.0, 1.0], seed=0) == a + b
    assert mix([a, b], [2.0, 1.0], seed=0) == a + a + b
    assert mix([a], [3], seed=5) == a * 3


def test_mix_fractional_weight_is_a_seeded_sample():
    items = list(range(40))
    half = mix([items], [0.5], seed=1)
    assert len(half) == 20 and len(set(half)) == 20 and set(half) <= set(items)
    assert mix([items], [0.5], seed=1) == half  # deterministic per seed
    others = [mix([items], [0.5], seed=s) for s in (2, 3, 4)]
    assert all(o != half for o in others)  # different seeds give different samples
    assert len({tuple(sorted(o)) for o in [half, *others]}) > 1  # not just a different order

    one_and_half = mix([items], [1.5], seed=1)
    assert one_and_half[:40] == items and len(one_and_half) == 60
    assert Counter(one_and_half).most_common(1)[0][1] == 2  # the sampled part has no repeats

    quarter = mix([items, list("abcd")], [0.25, 1.0], seed=9)
    assert len(quarter) == 14 and quarter[-4:] == list("abcd")


def test_mix_takes_round_w_times_n_rows_as_documented():
    items = list(range(5))
    assert len(mix([items], [1.5], seed=0)) == round(1.5 * 5)


# ----------------------------------------------------------------------------------------------- edge cases


def test_each_odd_row_is_its_own_error_and_null_stands_for_absent(tmp_path):
    """Every row is checked on its own JSON types: the odd rows are listed, the good ones around them are not."""
    rows = [dict(GOOD, margin=None), "", dict(GOOD, margin=1.5), dict(GOOD, prompt=None), dict(GOOD, prompt=["x"])]
    path = write_lines(tmp_path / "nulls.jsonl", rows)
    message = load_error(path)
    assert message == (
        "2 invalid row(s) (set data.skip_invalid: true to skip them):\n"
        f"  {path}:line 4: field 'prompt': missing (its columns ['chosen', 'rejected'] make it an implicit row, "
        "but the file's rows are pairwise (most rows'))\n"
        f"  {path}:line 5: field 'prompt': must be text or chat messages, got list"
    )


def test_directory_that_is_not_a_saved_dataset_is_a_data_error(tmp_path):
    folder = tmp_path / "just_a_folder"
    folder.mkdir()
    with pytest.raises(DataError, match="just_a_folder"):
        read_rows(str(folder))


def test_pinpoint_ignores_int_float_mixing(tmp_path):
    rows = [dict(GOOD, margin=1), dict(GOOD, margin=0.5), "", GOOD, dict(GOOD, prompt=["a", "list"])]
    path = write_lines(tmp_path / "intfloat.jsonl", rows)
    assert f"{path}:line 5: field 'prompt'" in load_error(path)


def test_a_good_row_after_odd_ones_is_not_blamed(tmp_path):
    # Arrow's typing (and the line scan that explained its refusals) blamed line 4, the one good row
    rows = [dict(GOOD, prompt=None), "", dict(GOOD, prompt=["a", "list"]), GOOD]
    path = write_lines(tmp_path / "nullfirst.jsonl", rows)
    message = load_error(path)
    assert f"{path}:line 1: field 'prompt': missing" in message and f"{path}:line 3: field 'prompt'" in message
    assert "line 4" not in message


def test_non_object_in_a_json_array_file(tmp_path):
    path = tmp_path / "array.json"
    path.write_text('[\n  {"prompt": "p", "chosen": "a", "rejected": "b"},\n  [1, 2]\n]\n')
    message = load_error(str(path))
    assert message.startswith(f"{path}:row 1: the row is a list, not a JSON object")


# ---------------------------------------------------------------------------------------------------- real data


def _real_rows() -> list[dict]:
    with gzip.open(REAL_DATA, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def real():
    if not REAL_DATA.exists():
        pytest.skip(f"{REAL_DATA} not found")
    per_file, report = load_examples([str(REAL_DATA)], DataConfig(skip_invalid=True))
    return _real_rows(), per_file[0], report


# Rows of the harmless-base test split whose chosen answer is empty: the chosen conversation ends with
# "\n\nAssistant: " (the annotator preferred no answer), so the chosen completion is the lone space " ".
EMPTY_CHOSEN_LINES = (87, 517, 926, 1104)


def test_real_hh_rows_split_exactly(real):
    rows, examples, report = real
    assert len(rows) == 2312 and report.rows == 2312
    assert len(examples) == 2312 - len(EMPTY_CHOSEN_LINES)
    by_line = {int(e.source.rsplit("line ", 1)[1]): e for e in examples}
    assert len(by_line) == len(examples)
    assert set(by_line) == set(range(1, 2313)) - set(EMPTY_CHOSEN_LINES)
    for line, ex in by_line.items():
        assert ex.source == f"{REAL_DATA}:line {line}"
        row = rows[line - 1]
        assert len(ex.completions) == 2 and ex.labels.margin == 0.0
        chosen, rejected = ex.completions
        assert isinstance(ex.prompt, str) and ex.prompt
        assert ex.prompt + chosen == row["chosen"]
        assert ex.prompt + rejected == row["rejected"]
        assert chosen != rejected and chosen.strip() and rejected.strip()
        # the prompt is cut just after the last marker both texts share
        assert ex.prompt.endswith(MARKER)
        shared = len(ex.prompt)
        while (
            shared < min(len(row["chosen"]), len(row["rejected"])) and row["chosen"][shared] == row["rejected"][shared]
        ):
            shared += 1
        assert MARKER not in row["chosen"][len(ex.prompt) - len(MARKER) + 1 : shared]


def test_real_hh_invalid_rows(real):
    rows, _, report = real
    for line in EMPTY_CHOSEN_LINES:
        row = rows[line - 1]
        assert row["chosen"].endswith("\n\nAssistant: ") and row["rejected"].startswith(row["chosen"])
    assert report.skipped == Counter({"chosen: empty completion": len(EMPTY_CHOSEN_LINES)})
    message = load_error(str(REAL_DATA))
    assert message.split("\n") == [
        f"{len(EMPTY_CHOSEN_LINES)} invalid row(s) (set data.skip_invalid: true to skip them):",
        *(f"  {REAL_DATA}:line {n}: field 'chosen': empty completion" for n in EMPTY_CHOSEN_LINES),
    ]


# ----------------------------------------------------------------------------------------------- label kinds


def test_tie_blocks_in_ranked_rows_share_a_rank(tmp_path):
    path = write_lines(tmp_path / "ties.jsonl", [{"prompt": "p", "ranked_outputs": [["a", "b"], "c", ["d"]]}])
    (ex,), errors, _ = load_file(path, DataConfig())
    assert not errors
    assert ex.completions == ("a", "b", "c", "d") and ex.labels.ranks == (0, 0, 1, 2)
    chat = [{"role": "assistant", "content": "x"}]
    row = {"prompt": msgs("user", "q"), "ranked_outputs": [chat, [msgs("assistant", "y"), msgs("assistant", "z")]]}
    ex = parse_row(row, "ranked", DataConfig(), "f:line 1")
    assert ex.labels.ranks == (0, 1, 1) and ex.completions[0] == chat  # a message list is one completion, not a block
    bad = parse_row({"prompt": "p", "ranked_outputs": ["a", []]}, "ranked", DataConfig(), "f:line 3")
    assert str(bad) == "f:line 3: field 'ranked_outputs[1]': an empty list of tied completions"
    dup = parse_row({"prompt": "p", "ranked_outputs": [["a", "a"], "b"]}, "ranked", DataConfig(), "f:line 4")
    assert "ranked_outputs[0][1]" in str(dup) and "duplicate" in str(dup)


def test_scored_rows_rank_by_score_and_standardise_per_file(tmp_path):
    rows = [
        {"prompt": "p", "completions": ["a", "b", "c"], "scores": [1, 3, 1]},
        {"prompt": "q", "completions": ["d", "e"], "scores": [5.0, 2.0]},
    ]
    examples, errors, _ = load_file(write_lines(tmp_path / "scored.jsonl", rows), DataConfig())
    assert not errors
    assert examples[0].labels.ranks == (1, 0, 1) and examples[1].labels.ranks == (0, 1)  # equal scores tie
    assert examples[0].labels.scores == (1.0, 3.0, 1.0)
    values = [1, 3, 1, 5, 2]
    mean, std = sum(values) / 5, math.sqrt(sum((v - 2.4) ** 2 for v in values) / 5)
    targets = examples[0].labels.targets + examples[1].labels.targets
    assert targets == pytest.approx([(v - mean) / std for v in values])
    renamed = [{"question": "p", "answers": ["a", "b"], "ratings": [0.1, 0.2]}]
    cfg = DataConfig(prompt_column="question", completions_column="answers", scores_column="ratings")
    (ex,), _, _ = load_file(write_lines(tmp_path / "renamed.jsonl", renamed), cfg)
    assert ex.labels.ranks == (1, 0)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "completions": ["a", "b"], "scores": [1]}, "field 'scores': needs one number per completion"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": [1, "x"]}, "field 'scores[1]': must be a finite number"),
        ({"prompt": "p", "completions": ["a"], "scores": [1]}, "field 'completions': needs at least 2 completions"),
        (
            {"prompt": "p", "completions": ["a", "b"], "scores": [1, 2], "weight": 0},
            "field 'weight': must be a positive",
        ),
        (
            {"prompt": "p", "completions": ["a", "b"], "scores": [1, 2], "weight": "x"},
            "field 'weight': must be a positive",
        ),
        # finite in JSON but inf in the float32 labels: the loss would be non-finite from the first step
        (
            {"prompt": "p", "completions": ["a", "b"], "scores": [1, 2], "weight": 1e39},
            "field 'weight': must be a positive number within float32's range, got 1e+39",
        ),
        (
            {"prompt": "p", "completions": ["a", "b"], "scores": [1, -1e39]},
            "field 'scores[1]': must be a finite number within float32's range",
        ),
        (
            {"prompt": "p", "completions": ["a", "b"], "scores": [1, 2], "margin": 1e39},
            "field 'margin': must be a number within float32's range",
        ),
        # numeric strings are rejected, never converted
        ({"prompt": "p", "completions": ["a", "b"], "scores": [1, "2"]}, "field 'scores[1]': must be a finite number"),
        (
            {"prompt": "p", "completions": ["a", "b"], "scores": [1, 2], "weight": "2"},
            "field 'weight': must be a positive",
        ),
    ],
)
def test_scored_row_errors_name_the_field(row, message):
    assert message in str(parse_row(row, "scored", DataConfig(), "f:line 9"))


def test_row_weights_and_mixed_label_kinds(tmp_path):
    pairs = write_lines(tmp_path / "pairs.jsonl", [dict(GOOD, weight=2.5), GOOD])
    scored = write_lines(tmp_path / "scored.jsonl", [{"prompt": "p", "completions": ["a", "b"], "scores": [0, 1]}])
    ranked = write_lines(tmp_path / "ranked.jsonl", [{"prompt": "p", "ranked_outputs": [["a", "b"], "c"]}])
    per_file, _ = load_examples([pairs, scored, ranked], DataConfig())
    assert [e.labels.weight for e in per_file[0]] == [2.5, 1.0]
    assert per_file[1][0].labels.scores == (0.0, 1.0) and per_file[2][0].labels.ranks == (0, 0, 1)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.parquet"])
def test_a_file_replaced_with_the_same_mtime_is_read_anew(tmp_path, name):
    """cp -p, rsync and archives keep the modification time: the rows must still be the new file's."""
    import os
    import shutil

    write = _write_parquet if name.endswith(".parquet") else write_lines
    path, new = Path(tmp_path / name), tmp_path / "new" / name
    new.parent.mkdir()
    write(path, [{"prompt": "old", "chosen": "a", "rejected": "b"}])
    write(new, [{"prompt": "new", "chosen": "a", "rejected": "b"}])
    assert read_rows(str(path))[0]["prompt"] == "old"
    stat = path.stat()
    os.utime(new, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.copy2(new, path)  # cp -p: same size, same mtime, other bytes
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    assert read_rows(str(path))[0]["prompt"] == "new"


def test_corrupt_gzip_and_invalid_utf8_name_the_file(tmp_path):
    """Both used to be tracebacks (exit 1) without the file's name."""
    gz = tmp_path / "rows.jsonl.gz"
    gz.write_bytes(b"not gzip at all")
    assert load_error(str(gz)).startswith(f"{gz}: not a readable gzip file")
    bad = tmp_path / "rows.jsonl"
    bad.write_bytes(b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}\n')
    assert load_error(str(bad)).startswith(f"{bad}: not UTF-8 text (byte 13 of the file")
    zipped = tmp_path / "latin.jsonl.gz"
    zipped.write_bytes(gzip.compress(b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}\n'))
    assert load_error(str(zipped)).startswith(f"{zipped}: not UTF-8 text (byte 13 of the decompressed file")


def test_unknown_chat_roles_are_rejected(tmp_path):
    row = {"prompt": [{"role": "human", "content": "hi"}], "chosen": "a", "rejected": "b"}
    path = write_lines(tmp_path / "roles.jsonl", [row])
    assert "line 1: field 'prompt': message 0 has role 'human', not one of system, user, assistant, tool" in load_error(
        path
    )


# ---------------------------------------------------------------------------------------------- attribute ratings

ATTRS = ["helpfulness", "verbosity"]


def test_rated_rows_and_rating_lists_mask_missing_ratings(tmp_path):
    """HelpSteer2-shaped rows hold one completion; other formats carry a list per attribute; null or absent is NaN."""
    rated = write_lines(
        tmp_path / "rated.jsonl",
        [
            {"prompt": "p", "response": " a", "helpfulness": 3, "verbosity": None},
            {"prompt": "q", "response": " b", "helpfulness": 0.5},  # verbosity absent
        ],
    )
    first, second = load_one(rated, attributes=ATTRS)
    assert first.completions == (" a",) and first.labels.ranks == (0,)
    assert first.labels.attributes[0][0] == 3.0 and math.isnan(first.labels.attributes[0][1])
    assert second.labels.attributes[0][0] == 0.5 and math.isnan(second.labels.attributes[0][1])
    ranked = write_lines(
        tmp_path / "ranked.jsonl",
        [{"prompt": "p", "ranked_outputs": [" a", [" b", " c"]], "helpfulness": [4, None, 1]}],
    )
    (example,) = load_one(ranked, attributes=ATTRS)
    got = example.labels.attributes  # aligned with the completions in the row's order, tie blocks flattened
    assert [r[0] for r in got][::2] == [4.0, 1.0] and math.isnan(got[1][0]) and all(math.isnan(r[1]) for r in got)
    (pair,) = load_one(
        write_lines(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": " a", "rejected": " b", "verbosity": [1, 2]}]),
        attributes=ATTRS,
    )
    assert [r[1] for r in pair.labels.attributes] == [1.0, 2.0]
    (plain,) = load_one(write_lines(tmp_path / "plain.jsonl", [{"prompt": "p", "ranked_outputs": [" a", " b"]}]))
    assert plain.labels.attributes is None  # no data.attributes: no ratings read


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "p", "response": " a", "helpfulness": "3"}, "field 'helpfulness': must be a number"),
        ({"prompt": "p", "response": " a", "helpfulness": True}, "field 'helpfulness': must be a number"),
        ({"prompt": "p", "response": " a", "helpfulness": 1e39}, "field 'helpfulness': must be a number within"),
        ({"prompt": "p", "response": " a"}, "field 'helpfulness/verbosity': every rating is missing"),
        ({"prompt": "p", "response": " ", "helpfulness": 1}, "field 'response': empty completion"),
        ({"prompt": "p", "ranked_outputs": [" a", " b"], "verbosity": [1]}, "field 'verbosity': needs a list of one"),
        ({"prompt": "p", "ranked_outputs": [" a", " b"], "verbosity": 2}, "field 'verbosity': needs a list of one"),
        ({"prompt": "p", "ranked_outputs": [" a", " b"], "verbosity": [1, "x"]}, "field 'verbosity[1]': must be"),
    ],
)
def test_bad_ratings_name_file_line_and_field(tmp_path, row, expected):
    path = write_lines(tmp_path / "bad.jsonl", [row])
    assert f"{path}:line 1: {expected}" in load_error(path, attributes=ATTRS)


def test_rated_rows_need_data_attributes(tmp_path):
    path = write_lines(tmp_path / "rated.jsonl", [{"prompt": "p", "response": " a", "helpfulness": 3}])
    assert "rated completions: name their rating columns in data.attributes" in load_error(path)


def test_rated_rows_read_the_configured_response_column(tmp_path):
    path = write_lines(tmp_path / "rated.jsonl", [{"prompt": "p", "answer": " a", "helpfulness": 2}])
    assert "cannot tell the format" in load_error(path, attributes=ATTRS)
    (example,) = load_one(path, attributes=ATTRS, response_column="answer")
    assert example.completions == (" a",) and example.labels.attributes[0][0] == 2.0
