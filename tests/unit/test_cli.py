"""The `bigrm` command line: every subcommand's --help, and bad options as one `error:` line with exit code 2."""

from __future__ import annotations

import os

import pytest

from bigrm import cli
from bigrm.training import failures

MODEL_ARGS = ["--model", "no-model", "--data", "no-data.jsonl", "--out", "scores.jsonl"]


def test_console_script_dispatches_to_train(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bigrm", "train", "--help"])
    assert cli.main() == 0
    assert "--train.lr" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["bigrm", "fly"])
    assert cli.main() == 2
    assert cli.train_main(["--lr", "nope"]) == 2
    assert "--train.lr: expected float" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "code"), [(["--help"], 0), (["-h"], 0), ([], 2), (["fly"], 2)])
def test_bigrm_alone_or_with_help_lists_the_commands(monkeypatch, capsys, argv, code):
    monkeypatch.setattr("sys.argv", ["bigrm", *argv])
    assert cli.main() == code
    out = capsys.readouterr()
    text = out.out if code == 0 else out.err
    assert "commands:" in text and all(f"\n  {name} " in text for name in cli.COMMANDS)
    assert "A training checkpoint → a verified plain Hugging Face classifier." in text
    assert ("unknown command 'fly'" in text) == (argv == ["fly"])


@pytest.mark.parametrize(
    ("main", "listed"),
    [
        (cli.score_main, ["--data FILE", "--out OUT", "--segments", "--separator", "--per-token", "--data.max_length"]),
        (cli.eval_main, ["--report DIR", "--share_prompt", "--data.overlong", "--loss.tie_threshold"]),
        (cli.export_main, ["--checkpoint", "--merge-attributes", "--dtype {auto,bf16,fp32}"]),
        (cli.prepare_main, ["usage: bigrm prepare", "--data.num_proc", "--config FILE.yaml"]),
    ],
)
def test_help_lists_every_option_with_its_default(main, listed, capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in listed), [flag for flag in listed if flag not in text]
    if main in (cli.score_main, cli.eval_main):  # the sections' options, documented as in training
        flat = " ".join(text.split())
        doc = "Most tokens in one scored sequence (prompt + completion + EOS)."
        assert f"--data.max_length MAX_LENGTH {doc} (type: int, default: 1024)" in flat
        assert "--loss." not in text if main is cli.score_main else "--train." not in text


@pytest.mark.parametrize(
    ("main", "argv", "message"),
    [
        (cli.score_main, [*MODEL_ARGS, "--dtype", "fp16"], "--dtype: expected Literal['auto', 'bf16', 'fp32']. Got"),
        (cli.score_main, [*MODEL_ARGS, "--loss.tie_coef", "1"], "unrecognized arguments: --loss.tie_coef 1"),
        (cli.eval_main, [*MODEL_ARGS, "--max_length", "abc"], "--data.max_length: expected int. Got value: abc"),
        (cli.eval_main, MODEL_ARGS[2:], "the following arguments are required: model"),
        (cli.export_main, ["--checkpoint", "c", "--out", "o", "--merge"], "unrecognized arguments: --merge"),
        (cli.prepare_main, ["--no_such_key", "1"], "unrecognized arguments: --no_such_key 1"),
    ],
)
def test_a_bad_option_is_one_error_line_on_rank_0(main, argv, message, capsys, monkeypatch):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    monkeypatch.setenv("RANK", "1")  # the other ranks meet the same option: they stay quiet
    assert main(argv) == 2
    assert capsys.readouterr().err == ""


def test_a_bad_training_option_is_one_line_from_the_rank_that_meets_it_first(capsys, monkeypatch):
    """Every rank meets it; the first to fail prints it (rank 1 here), the others stay quiet with its exit code."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", f"test-cli-{os.getpid()}")
    argv, message = ["--objective", "listwise"], "--loss.objective: expected Literal['pairwise', 'listmle']"
    try:
        for rank, said in (("1", True), ("0", False)):
            monkeypatch.setenv("RANK", rank)
            assert cli.train_main(argv) == 2
            err = capsys.readouterr().err
            assert (err.startswith("error: ") and message in err and err.count("\n") == 1) if said else err == "", err
    finally:
        failures.record_path().unlink(missing_ok=True)


def test_a_bad_recipe_names_its_file(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  epochs: 1\n  lr: fast\n")
    assert cli.train_main(["--config", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: train.lr: expected float. Got value: fast\n"


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(capsys):
    def interrupted() -> None:
        raise KeyboardInterrupt

    assert cli._run(interrupted) == 130
    assert capsys.readouterr().err == "interrupted (SIGINT)\n"
