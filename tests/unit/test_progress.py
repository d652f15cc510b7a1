"""Progress of the long phases: a bar on a terminal, plain lines in a batch log, rank 0 only; data reading and
tokenising, model loading, scoring and export report through bigrm.progress."""

from __future__ import annotations

import json
import re
import sys

import pytest
from tqdm.auto import tqdm

from bigrm import cli, dist, progress


@pytest.fixture
def every_update(monkeypatch):
    """A batch log (stderr is not a terminal under pytest) that gets a line at every update instead of every 30 s."""
    monkeypatch.setattr(progress, "INTERVAL", 0.0)


def test_a_batch_log_gets_plain_lines_and_an_end_line(every_update, capsys):
    assert list(progress.each(range(4), "demo", unit="row")) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r",.*", "", line) for line in lines] == [
        "demo: 1/4 row (25%)", "demo: 2/4 row (50%)", "demo: 3/4 row (75%)", "demo: 4/4 row (100%)",
        "demo: 4/4 row (100%)",
    ]  # fmt: skip
    assert all("\r" not in line and re.search(r"row/s, \d+ s$", line) for line in lines)


def test_a_short_phase_in_a_batch_log_prints_nothing(capsys):
    list(progress.each(range(100), "quick"))
    assert capsys.readouterr().err == ""  # under INTERVAL: neither progress nor end line


def test_only_rank_zero_reports(every_update, monkeypatch, capsys):
    monkeypatch.setattr(dist, "is_main", lambda: False)
    list(progress.each(range(3), "demo"))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    counter = progress.bar(3, "demo")
    assert isinstance(counter, tqdm) and counter.disable


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    counter = progress.bar(3, "demo", unit="row")
    assert isinstance(counter, tqdm) and not counter.disable and counter.unit == "row"
    counter.close()


def test_stages_name_the_step_under_way(every_update, capsys):
    stages = progress.Stages("export", ("consolidate shards", "write", "verify"))
    for _ in range(3):
        stages.advance()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("export: 1/3 stage (33%)") and lines[0].endswith("stage=write")
    assert lines[1].endswith("stage=verify") and lines[2].startswith("export: 3/3 stage (100%)")


def test_model_loading_reports_through_transformers_hook(every_update, llama_dir, capsys):
    from transformers import AutoTokenizer

    from bigrm.model.reward_model import load_classifier

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    with progress.transformers_bars():
        load_classifier(str(llama_dir), "auto", "sdpa", tokenizer)
    err = capsys.readouterr().err
    assert re.search(r"^Loading weights: (\d+)/\1 it \(100%\)", err, re.M), err
    load_classifier(str(llama_dir), "auto", "sdpa", tokenizer)  # outside: transformers' own bar, not our lines
    assert not re.search(r"^Loading weights: \d+/\d+ it \(", capsys.readouterr().err, re.M)


def test_score_and_data_phases_report(every_update, llama_dir, tmp_path, capsys):
    from bigrm.builtin.tiny import build_tokenizer
    from bigrm.config import DataConfig
    from bigrm.data.rows import load_examples
    from bigrm.data.tokenise import encode_examples

    rows = [{"prompt": f"p{i}", "chosen": "good answer", "rejected": "bad"} for i in range(600)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    assert cli.score_main(["--model", str(llama_dir), "--data", str(data), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "read rows.jsonl: 600/600 row (100%)" in err and "score: 600/600 row (100%)" in err
    assert "Loading weights: " in err

    (examples,), _ = load_examples([str(data)], DataConfig())
    assert "validate rows.jsonl: 600/600 row (100%)" in capsys.readouterr().err
    encode_examples(examples, build_tokenizer(), 64, "error", num_proc=2)  # 3 chunks over 2 processes
    assert "tokenise: 3/3 x256 prompts (100%)" in capsys.readouterr().err
