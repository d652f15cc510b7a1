"""`bigrm score` against plain transformers: every reward, segment value and per-token value is the classifier's
output on the matching prefix of the scored sequence, forwarded alone."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bigrm import cli
from bigrm.config import DataConfig
from bigrm.data.sequences import scored_sequence
from bigrm.errors import DataError
from bigrm.inference import scoring


@pytest.fixture(scope="module")
def plain(llama_dir):
    model = AutoModelForSequenceClassification.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(llama_dir)

    def value(ids: list[int]) -> float:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    return value, tok


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_score(tmp_path, model_dir, data, *flags):
    out = tmp_path / "scored.jsonl"
    assert cli.score_main(["--model", str(model_dir), "--data", str(data), "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_rewards_match_plain_transformers_for_every_format(tmp_path, llama_dir, plain):
    value, tok = plain
    rows = [
        {"prompt": "write a positive review:", "ranked_outputs": [" great superb", " awful", " the it was"]},
        {"prompt": "write a negative review:", "ranked_outputs": [" awful dismal", " lovely"]},
    ]
    out = run_score(tmp_path, llama_dir, write(tmp_path / "r.jsonl", rows), "--max_tokens_per_batch", "40")
    for row, scored in zip(rows, out, strict=True):
        assert scored["prompt"] == row["prompt"] and scored["ranked_outputs"] == row["ranked_outputs"]
        expected = [value(tok(row["prompt"] + c)["input_ids"] + [tok.eos_token_id]) for c in row["ranked_outputs"]]
        assert scored["rewards"] == pytest.approx(expected, abs=1e-5)

    pairs = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}]
    out = run_score(tmp_path, llama_dir, write(tmp_path / "p.jsonl", pairs))
    expected = [value(tok(pairs[0][c])["input_ids"] + [tok.eos_token_id]) for c in ("chosen", "rejected")]
    assert out[0]["rewards"] == pytest.approx(expected, abs=1e-5)

    chat = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go away"}]
    out = run_score(tmp_path, llama_dir, write(tmp_path / "c.jsonl", chat))
    rendered = [tok.apply_chat_template(chat[0]["prompt"] + [{"role": "assistant", "content": c}], tokenize=False)
                for c in ("hello", "go away")]  # fmt: skip
    expected = [value(tok(t, add_special_tokens=False)["input_ids"]) for t in rendered]  # the rendering as is
    assert out[0]["rewards"] == pytest.approx(expected, abs=1e-5)


def test_per_token_and_separator_segments_are_prefix_values(tmp_path, llama_dir, plain):
    value, tok = plain
    rows = [{"prompt": "Q: add 2 and 3.", "chosen": " First, 2.\nThen 3.\nSo 5.", "rejected": " It is 7."}]
    out = run_score(tmp_path, llama_dir, write(tmp_path / "s.jsonl", rows), "--per-token", "--separator", "\n")[0]
    for k, completion in enumerate((rows[0]["chosen"], rows[0]["rejected"])):
        seq = scored_sequence(tok, rows[0]["prompt"], completion, 1024)
        tail = seq.ids[seq.completion_start :]
        assert out["per_token_ids"][k] == tail
        prefixes = [value(seq.ids[: seq.completion_start + i + 1]) for i in range(len(tail))]
        assert out["per_token_rewards"][k] == pytest.approx(prefixes, abs=1e-5)
        assert out["per_token_rewards"][k][-1] == pytest.approx(out["rewards"][k], abs=1e-6)
    # pieces end after each "\n": the value at the last token ending there, then the reward at EOS
    seq = scored_sequence(tok, rows[0]["prompt"], rows[0]["chosen"], 1024)
    text_end = [len(rows[0]["prompt"]) + len(" First, 2.\n"), len(rows[0]["prompt"]) + len(" First, 2.\nThen 3.\n")]
    idx = [max(i for i, e in enumerate(seq.ends) if e <= end) for end in text_end]
    expected = [value(seq.ids[: i + 1]) for i in idx] + [out["rewards"][0]]
    assert out["segment_rewards"][0] == pytest.approx(expected, abs=1e-5)
    assert len(out["segment_rewards"][1]) == 1 and out["segment_rewards"][1][0] == pytest.approx(out["rewards"][1])


def test_piece_lists_mark_segments(tmp_path, llama_dir, plain):
    value, tok = plain
    pieces = [["Step one.", " Step two."], ["Only step."]]
    rows = [{"prompt": "Solve:", "ranked_outputs": pieces}]
    out = run_score(tmp_path, llama_dir, write(tmp_path / "pieces.jsonl", rows), "--segments")[0]
    seq = scored_sequence(tok, "Solve:", "Step one. Step two.", 1024)
    cut = max(i for i, e in enumerate(seq.ends) if e <= len("Solve:Step one."))
    assert out["segment_rewards"][0] == pytest.approx([value(seq.ids[: cut + 1]), out["rewards"][0]], abs=1e-5)
    assert out["rewards"][0] == pytest.approx(value(seq.ids), abs=1e-5)
    assert out["ranked_outputs"] == pieces  # the input row comes back as it was


def test_piece_lists_of_scored_rows_mark_segments(tmp_path, llama_dir, plain):
    """A scored row's pieces are in its completions column: --segments used to look for a 'chosen' column there."""
    value, tok = plain
    pieces = [["Step one.", " Step two."], ["Only step."]]
    rows = [{"prompt": "Solve:", "completions": pieces, "scores": [0.5, 2.0]}]
    out = run_score(tmp_path, llama_dir, write(tmp_path / "scored-pieces.jsonl", rows), "--segments")[0]
    assert "error" not in out
    seq = scored_sequence(tok, "Solve:", "Step one. Step two.", 1024)
    cut = max(i for i, e in enumerate(seq.ends) if e <= len("Solve:Step one."))
    assert out["segment_rewards"][0] == pytest.approx([value(seq.ids[: cut + 1]), out["rewards"][0]], abs=1e-5)
    assert out["rewards"][0] == pytest.approx(value(seq.ids), abs=1e-5)
    only = scored_sequence(tok, "Solve:", "Only step.", 1024)
    assert out["segment_rewards"][1] == pytest.approx([out["rewards"][1]])
    assert out["rewards"][1] == pytest.approx(value(only.ids), abs=1e-5)
    assert out["completions"] == pieces and out["scores"] == [0.5, 2.0]  # the input row comes back as it was


def test_invalid_rows_stop_or_come_back_with_their_reason(tmp_path, llama_dir):
    rows = [{"prompt": "p", "ranked_outputs": ["a", "b"]}, {"prompt": "p", "ranked_outputs": ["a"]}]
    data = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match="line 2: field 'ranked_outputs': needs at least 2"):
        model, tok, _, _ = scoring.load_model(str(llama_dir), torch.device("cpu"))
        scoring.prepare(str(data), DataConfig(), tok)
    out = run_score(tmp_path, llama_dir, data, "--data.skip_invalid", "true")
    assert out[0]["rewards"] is not None and "error" not in out[0]
    assert out[1]["rewards"] is None and "needs at least 2 completions" in out[1]["error"]
    long_rows = [{"prompt": "p", "ranked_outputs": ["a " * 50, "b"]}]
    out = run_score(tmp_path, llama_dir, write(tmp_path / "long.jsonl", long_rows),
                    "--data.max_length", "20", "--data.overlong", "skip")  # fmt: skip
    assert out[0]["rewards"] is None and "longer than max_length" in out[0]["error"]
    assert cli.score_main(["--model", str(llama_dir), "--data", str(data), "--out", str(tmp_path / "x"),
                           "--train.lr", "1"]) == 2  # fmt: skip


def test_unusable_steps_always_stop_and_overlong_rows_per_data_overlong(tmp_path, llama_dir):
    """A row's reason is its first completion that cannot be scored; unusable steps stop the run whatever
    data.overlong says, an over-long completion only with data.overlong: error; the reasons listed in row order."""
    rows = [
        {"prompt": "p", "completions": [" gre", "at"], "labels": [1, 0]},  # " great" is one token: no step end
        {"prompt": "r", "completions": [" good" * 30, " fine"], "labels": [1, 0]},
        {"prompt": "s", "completions": [" nice", " gre", "at"], "labels": [1, 1, 0]},
        {"prompt": "q", "completions": [" good", " fine"], "labels": [1, 1]},
    ]
    data = write(tmp_path / "glued.jsonl", rows)
    _, tok, _, _ = scoring.load_model(str(llama_dir), torch.device("cpu"))
    cfg = DataConfig(step_separator="", max_length=20, step_layout="joined")  # trl: steps never merge
    boundary = "step {} does not end at a token boundary"
    reasons = [boundary.format(0), "longer than max_length", boundary.format(1)]
    for overlong, stopping in (("error", [0, 1, 2]), ("skip", [0, 2])):
        with pytest.raises(DataError, match=rf"{len(stopping)} row\(s\) cannot be scored") as err:
            scoring.prepare(str(data), replace(cfg, overlong=overlong), tok)
        listed = str(err.value).splitlines()[1:]
        assert all(f"line {i + 1}: completion 0: " in line for i, line in zip(stopping, listed, strict=True))
        assert all(reasons[i] in line for i, line in zip(stopping, listed, strict=True))
    results = scoring.prepare(str(data), replace(cfg, skip_invalid=True), tok)
    assert [r.example is None for r in results] == [True, True, True, False]
    assert all(reason in r.error for reason, r in zip(reasons, results, strict=False))
    (seq,) = results[3].scored
    assert [seq.ends[i] for i in results[3].steps[0]] == [len("q good"), len("q good fine")]


def test_token_ends_are_read_only_for_segments(tmp_path, llama_dir):
    data = write(tmp_path / "r.jsonl", [{"prompt": "p", "ranked_outputs": [" a b", " c"]}])
    _, tok, _, _ = scoring.load_model(str(llama_dir), torch.device("cpu"))
    (plain,) = scoring.prepare(str(data), DataConfig(), tok)
    (segmented,) = scoring.prepare(str(data), DataConfig(), tok, segments=True, separator=" ")
    assert [s.ends for s in plain.scored] == [None, None]
    assert [s._replace(ends=None) for s in segmented.scored] == plain.scored
    assert [s.ends[-1] for s in segmented.scored] == [len("p a b"), len("p c")]  # the appended EOS ends the text


def test_eval_on_real_hh_pairs_equals_plain_transformers(tmp_path, llama_dir, plain):
    """bigrm eval's numbers against rewards computed one sequence at a time with plain transformers."""
    import gzip
    import itertools

    from tests.helpers.paths import HH_DATA

    value, tok = plain
    with gzip.open(HH_DATA, "rt") as fh:
        rows = [json.loads(line) for line in itertools.islice(fh, 120)]
    data = write(tmp_path / "hh.jsonl", rows)
    flags = ["--data.max_length", "192", "--data.overlong", "skip", "--data.skip_invalid", "true"]
    out = tmp_path / "eval.json"
    assert cli.eval_main(["--model", str(llama_dir), "--data", str(data), "--out", str(out), *flags]) == 0
    got = json.loads(out.read_text())

    cfg = DataConfig(max_length=192, overlong="skip", skip_invalid=True)
    results = scoring.prepare(str(data), cfg, tok)
    scored = [r for r in results if r.error is None]
    rewards = [[value(s.ids) for s in r.scored] for r in scored]
    assert got["num_prompts"] == len(scored) and got["num_rows_skipped"] == len(rows) - len(scored) > 0
    assert got["skipped"] == [r.error for r in results if r.error]  # each with its file:line and reason
    assert all(reason.startswith(f"{data}:line ") for reason in got["skipped"])
    assert got["pairwise_accuracy"] == sum(c > r for c, r in rewards) / len(rewards)
    flat = torch.tensor([x for r in rewards for x in r], dtype=torch.float64)
    assert got["reward_mean"] == pytest.approx(flat.mean().item(), abs=1e-4)
    assert got["reward_std"] == pytest.approx(flat.std(unbiased=False).item(), abs=1e-4)
    loss = sum(torch.nn.functional.softplus(torch.tensor(r - c)).item() for c, r in rewards) / len(rewards)
    assert got["loss"] == pytest.approx(loss, abs=1e-4)
    assert got["accuracy_by_k"] == {"2": got["pairwise_accuracy"]}


def test_scored_rows_get_the_training_regression_targets(tmp_path, llama_dir):
    """bigrm eval's loss for scored rows uses the same standardised targets as training."""
    from bigrm.data.rows import load_file

    rows = [
        {"prompt": "p", "completions": [" a", " b", " c"], "scores": [1, 3, 2]},
        {"prompt": "q", "completions": [" d", " e"], "scores": [5, 0]},
    ]
    data = write(tmp_path / "scored.jsonl", rows)
    _, tok, _, _ = scoring.load_model(str(llama_dir), torch.device("cpu"))
    prepared = [r.example.labels.targets for r in scoring.prepare(str(data), DataConfig(), tok)]
    trained = [e.labels.targets for e in load_file(str(data), DataConfig())[0]]
    assert prepared == trained and all(t is not None for t in prepared)


def test_score_uses_the_convention_the_model_records(tmp_path, llama_dir, plain, capsys):
    """An export trained with `grpo` is scored at GRPO's token without flags; an explicit option wins, with a warning;
    and the truncation count is reported as training reports it."""
    import shutil

    from bigrm.artifacts import export
    from bigrm.artifacts.export import CONVENTION_KEY

    value, tok = plain
    model_dir = tmp_path / "grpo-model"
    shutil.copytree(llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, CONVENTION_KEY: "grpo"}))
    export.seal(model_dir)  # a bigrm export is scored once verified
    rows = [{"prompt": "write a positive review:", "chosen": " great superb", "rejected": " awful"}]
    data = write(tmp_path / "r.jsonl", rows)
    out = run_score(tmp_path, model_dir, data)
    grpo = [
        value(tok(rows[0]["prompt"] + rows[0][k], add_special_tokens=False)["input_ids"])
        for k in ("chosen", "rejected")
    ]
    assert out[0]["rewards"] == pytest.approx(grpo, abs=1e-5)
    assert "data.reward_convention=grpo (recorded in the model)" in capsys.readouterr().out

    out = run_score(tmp_path, model_dir, data, "--data.reward_convention", "trl", "--data.max_length", "5")
    printed = capsys.readouterr().out
    assert "warning: scoring with data.reward_convention=trl; the model was trained with grpo" in printed
    assert "2 sequences had their prompt cut from the left" in printed
    seq = scored_sequence(tok, rows[0]["prompt"], rows[0]["chosen"], 5)
    assert seq.cut > 0 and out[0]["rewards"][0] == pytest.approx(value(seq.ids), abs=1e-5)


def test_output_paths_are_checked_before_any_scoring(tmp_path):
    """`score --out <dir>` used to fail after all the scoring; the model is not even loaded now."""
    for main in (cli.score_main, cli.eval_main):
        argv = ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"), "--out", str(tmp_path)]
        assert main(argv) == 2
    cli.writable(str(tmp_path / "new" / "dir" / "metrics.json"), "--out")  # eval --out into a missing directory
    assert (tmp_path / "new" / "dir").is_dir()


def refusal(capsys, model, data, tmp_path) -> str:
    """The one line `bigrm score --model model` stops with (exit 2, no traceback)."""
    assert cli.score_main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_partial_unverified_or_damaged_model_is_refused_in_one_line(tmp_path, llama_dir, capsys):
    """An export cut short (all its files, never verified), one whose weights were truncated or changed since it was
    verified, a plain Hugging Face directory with truncated weights, and a directory that does not exist (no hub
    lookup)."""
    import shutil

    from bigrm.artifacts import export

    data = write(tmp_path / "rows.jsonl", [{"prompt": "p", "ranked_outputs": ["a", "b"]}])
    tok = AutoTokenizer.from_pretrained(llama_dir)
    classifier = AutoModelForSequenceClassification.from_pretrained(llama_dir)
    dest = tmp_path / "export"
    export.save_classifier(classifier, classifier.state_dict(), tok, dest, {"reward_mean": 0.0, "reward_std": 1.0})
    assert "without bigrm_export.json: its writing was cut short or it was never verified" in refusal(
        capsys, dest, data, tmp_path
    )
    export.seal(dest)
    run_score(tmp_path, dest, data)  # verified: scored
    weights = dest / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF
    weights.write_bytes(bytes(content))
    assert refusal(capsys, dest, data, tmp_path).endswith(
        f"{weights} is not the file saved (its content hash differs): export it again (bigrm export --checkpoint ...)"
    )
    weights.write_bytes(bytes(content[:100]))
    assert f"{weights} has 100 bytes" in refusal(capsys, dest, data, tmp_path)

    plain_dir = tmp_path / "plain"
    shutil.copytree(llama_dir, plain_dir)
    (plain_dir / "model.safetensors").write_bytes((plain_dir / "model.safetensors").read_bytes()[:100])
    assert refusal(capsys, plain_dir, data, tmp_path).startswith(f"error: {plain_dir}: cannot read its weights (")
    missing = tmp_path / "no-such-model"
    assert refusal(capsys, missing, data, tmp_path) == (
        f"error: --model {missing}: no such directory (an exported model or a bigrm checkpoint)"
    )
