"""The streaming build (bigrm.data.stream) against reading every file whole: the same arrays, report and errors, at
any chunk size; chunk boundaries; a killed build."""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from bigrm.config import DataConfig
from bigrm.data import pipeline, stream
from bigrm.data.rows import load_examples, prompt_key
from bigrm.data.token_store import ARRAYS, TokenStore, concat
from bigrm.data.tokenise import encode_examples
from bigrm.data.tokenizer import prepare_tokenizer
from bigrm.errors import DataError
from tests.helpers.paths import HH_DATA


@pytest.fixture(scope="module")
def tok(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    prepare_tokenizer(tokenizer)
    return tokenizer


def whole(d: DataConfig, seed: int, tokenizer, paths: list[str], eval_paths: list[str]):
    """The reference: every file read whole, held out by prompt, each file tokenised at once (the build before the
    streaming one)."""
    per_file, report = load_examples(paths, d)
    log = [f"train data: {report.summary()}"]
    if eval_paths:
        eval_files, eval_report = load_examples(eval_paths, d)
        eval_examples = [e for f in eval_files for e in f]
        log.append(f"eval data: {eval_report.summary()}")
    elif d.eval_fraction > 0:
        rng, eval_examples, held_prompts = random.Random(seed), [], 0
        for i, examples in enumerate(per_file):
            keys = [prompt_key(e.prompt) for e in examples]
            prompts = list(dict.fromkeys(keys))
            order = list(range(len(prompts)))
            rng.shuffle(order)
            held = {prompts[j] for j in order[: round(d.eval_fraction * len(prompts))]}
            held_prompts += len(held)
            eval_examples += [e for e, k in zip(examples, keys, strict=True) if k in held]
            per_file[i] = [e for e, k in zip(examples, keys, strict=True) if k not in held]
        log.append(
            f"eval data: {held_prompts} prompts held out ({len(eval_examples)} groups; "
            f"data.eval_fraction={d.eval_fraction})"
        )
    else:
        eval_examples = []
        log.append("eval data: none (set data.eval_files or data.eval_fraction)")

    def encoded(examples):
        done = encode_examples(examples, tokenizer, d.max_length, d.overlong, d.reward_convention, d.max_errors, 2)
        return TokenStore.of(done, examples, len(d.attributes)), done.report.summary()

    train = []
    for examples in per_file:
        store, summary = encoded(examples)
        train.append(store)
        log.append(f"train tokens: {summary}")
    if not sum(len(s) for s in train):
        raise DataError("no training prompts left after validation")
    evals, summary = encoded(eval_examples)
    if eval_examples:
        log.append(f"eval tokens: {summary}")
    meta = {"train_file_groups": [len(s) for s in train], "log": log}
    if d.attributes:
        ratings = [r for f in per_file for e in f for r in (e.labels.attributes or ())]
        meta["attribute_stats"] = stream.rating_stats(
            np.array(ratings, dtype=np.float64).reshape(-1, len(d.attributes))
        )
    return concat(train), evals, meta


def streamed(d: DataConfig, seed: int, tokenizer, paths, eval_paths, directory: Path):
    meta = stream.build(d, seed, tokenizer, paths, eval_paths, directory)
    assert sorted(p.name for p in directory.iterdir()) == ["eval", "train"]  # the first pass's files are gone
    return TokenStore.load(directory / "train"), TokenStore.load(directory / "eval"), meta


def assert_same(a: TokenStore, b: TokenStore) -> None:
    for name in ARRAYS:
        assert a.a[name].dtype == b.a[name].dtype and a.a[name].shape == b.a[name].shape, name
        assert np.array_equal(a.a[name], b.a[name], equal_nan=a.a[name].dtype.kind == "f"), name


def check(d: DataConfig, tokenizer, paths, eval_paths, directory: Path, seed: int = 0) -> dict:
    """The streamed build equals the whole one, or raises the same error."""
    try:
        want = whole(d, seed, tokenizer, paths, eval_paths)
    except DataError as err:
        with pytest.raises(DataError) as got:
            streamed(d, seed, tokenizer, paths, eval_paths, directory)
        assert str(got.value) == str(err)
        return {"error": str(err)}
    got = streamed(d, seed, tokenizer, paths, eval_paths, directory)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    assert got[2] == want[2]
    return got[2]


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("task", ["ranked", "length", "steps", "attributes"])
def test_builtin_tasks_equal_whole_build(tok, tmp_path, task):
    attributes = ["help", "honest"] if task == "attributes" else []
    synthetic = replace(DataConfig().synthetic, task=task, num_train=90, num_eval=20)
    d = DataConfig(synthetic=synthetic, attributes=attributes, max_length=64, num_proc=2)
    pipeline.write_synthetic(d, tmp_path, 0, (1.0,) * len(attributes))
    specs, eval_paths = pipeline.sources(d, tmp_path)
    paths = [p for p, _ in specs]
    for i, chunk in enumerate((7, 8192)):  # chunks that cut prompts and groups, and one chunk
        d = replace(d, stream_chunk=chunk)
        check(d, tok, paths, eval_paths, tmp_path / f"eval-files-{i}")
        check(replace(d, eval_fraction=0.3), tok, paths, [], tmp_path / f"held-{i}", seed=3)


def test_hold_out_with_a_prompts_rows_in_several_chunks(tok, tmp_path):
    """Prompt i % 7: each prompt's rows lie in several chunks of 3 rows; the split is by prompt all the same."""
    rows = [{"prompt": f"q{i % 7}", "ranked_outputs": [f"good {i}", f"bad {i}"]} for i in range(40)]
    paths = [jsonl(tmp_path / "a.jsonl", rows), jsonl(tmp_path / "b.jsonl", rows[:25])]
    d = DataConfig(max_length=64, eval_fraction=0.4, stream_chunk=3)
    meta = check(d, tok, paths, [], tmp_path / "built")
    assert "prompts held out (" in meta["log"][1]
    train = TokenStore.load(tmp_path / "built" / "train")
    evals = TokenStore.load(tmp_path / "built" / "eval")
    for path in paths:  # each file's prompts held out on their own (as ever)

        def prompts(store, path=path) -> set:
            return {rows[int(g.source.rsplit("line ", 1)[1]) - 1]["prompt"] for g in store if g.source.startswith(path)}

        assert prompts(train) and prompts(evals) and not prompts(train) & prompts(evals)


def test_held_out_is_the_list_shuffle():
    rng_a, rng_b = random.Random(5), random.Random(5)
    for n in (0, 1, 2, 50, 1000):
        keys = np.frombuffer(b"".join(int(k).to_bytes(16, "little") for k in np.arange(n) % 37), "V16")
        mask, prompts = stream.held_out(keys, 0.3, rng_a)
        order, firsts = list(range(min(n, 37))), list(dict.fromkeys((np.arange(n) % 37).tolist()))
        rng_b.shuffle(order)
        held = {firsts[j] for j in order[: round(0.3 * len(firsts))]}
        assert mask.tolist() == [k in held for k in (np.arange(n) % 37).tolist()] and prompts == len(held)


def test_row_errors_at_chunk_boundaries(tok, tmp_path):
    """Chunks of 4 rows: invalid rows first and last in a chunk, and the file's last row, skipped or listed as the
    whole file's read lists them (with their lines)."""
    rows = [{"prompt": f"q{i}", "ranked_outputs": [f"good {i}", f"bad {i}"]} for i in range(13)]
    for i in (4, 7, 12):
        rows[i] = {"prompt": f"q{i}", "ranked_outputs": [f"good {i}"]}
    text = "".join(json.dumps(r) + "\n" + "\n" * (i == 5) for i, r in enumerate(rows))  # a blank line shifts lines
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    for skip in (False, True):
        for max_errors in (2, 20):
            d = DataConfig(max_length=64, stream_chunk=4, skip_invalid=skip, max_errors=max_errors)
            got = check(d, tok, [str(path)], [], tmp_path / f"b-{skip}-{max_errors}")
            assert ("error" in got) != skip
    assert "13 rows read, 3 skipped" in got["log"][0]


def test_file_errors_equal_whole_reads(tok, tmp_path):
    good = json.dumps({"prompt": "q", "ranked_outputs": ["a", "b"]})
    cases = {
        "bad-json.jsonl": f"{good}\n{{nope\n{good}\n[1]\n",
        "not-object.jsonl": f'{good}\n[1, 2]\n"text"\n',
        "utf8.jsonl": f"{good}\n{{nope\n".encode() + b'{"prompt": "\xff"}\n',
        "blank.jsonl": "\n  \n",
        "array.json": json.dumps([{"prompt": "q", "ranked_outputs": ["a", "b"]}] * 3),
        "bom.jsonl": "\ufeff" + f"{good}\n" * 3,
        "other-format.jsonl": f"{good}\n" * 3 + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n",
    }
    errors = {}
    for i, (name, text) in enumerate(cases.items()):
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        for skip in (False, True):
            errors[name, skip] = "error" in check(
                DataConfig(max_length=64, stream_chunk=2, skip_invalid=skip),
                tok,
                [str(path)],
                [],
                tmp_path / f"{i}{skip}",
            )
    fails = {name for (name, skip), failed in errors.items() if failed and skip}  # errors of the file, not of rows
    assert fails == {"bad-json.jsonl", "not-object.jsonl", "utf8.jsonl", "blank.jsonl"}
    assert errors["other-format.jsonl", False] and not errors["other-format.jsonl", True]
    gz = tmp_path / "rows.jsonl.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(f"{good}\n" * 5)
    check(DataConfig(max_length=64, stream_chunk=2), tok, [str(gz)], [], tmp_path / "gz")
    (tmp_path / "cut.jsonl.gz").write_bytes(gz.read_bytes()[:-9])
    cut = check(DataConfig(max_length=64, stream_chunk=2), tok, [str(tmp_path / "cut.jsonl.gz")], [], tmp_path / "cut")
    assert "gzip" in cut["error"]


def test_scores_standardised_over_the_whole_file(tok, tmp_path):
    rng = random.Random(0)
    rows = [
        {"prompt": f"q{i}", "completions": [f"a {i}", f"b {i}", f"c {i}"], "scores": [rng.gauss(3, 2) for _ in "abc"]}
        for i in range(30)
    ]
    rows[4]["scores"] = [1, 2, 7]  # JSON integers among the floats
    path = jsonl(tmp_path / "scored.jsonl", rows)
    check(DataConfig(max_length=64, stream_chunk=4), tok, [path], [], tmp_path / "b")


def test_overlong_errors_over_chunks(tok, tmp_path):
    rows = [
        {"prompt": f"q{i}", "ranked_outputs": [("long " * 80) * (i % 3 == 0) + f"a {i}", f"b {i}"]} for i in range(20)
    ]
    path = jsonl(tmp_path / "long.jsonl", rows)
    for overlong in ("error", "skip"):
        for max_errors in (3, 20):
            d = DataConfig(max_length=48, stream_chunk=4, overlong=overlong, max_errors=max_errors, eval_fraction=0.2)
            check(d, tok, [path], [], tmp_path / f"{overlong}{max_errors}")


@pytest.mark.skipif(not HH_DATA.exists(), reason="needs the HH data in ../shared/data")
def test_hh_equals_whole_build(tmp_path):
    from tests.helpers.real_tokenizers import qwen2_tokenizer

    qwen = qwen2_tokenizer()
    prepare_tokenizer(qwen)
    d = DataConfig(max_length=96, overlong="skip", skip_invalid=True, eval_fraction=0.1, stream_chunk=700, num_proc=2)
    meta = check(d, qwen, [str(HH_DATA)], [], tmp_path / "hh")
    assert "skipped (" in meta["log"][0] and "skipped:" in meta["log"][2]  # invalid and overlong rows both met


KILLED = """
import os, signal, sys
from transformers import AutoTokenizer
from bigrm.config import DataConfig
from bigrm.data import pipeline, token_store
from bigrm.data.tokenizer import prepare_tokenizer

def append_then_die(self, done, examples, real=token_store.StoreWriter.append):
    real(self, done, examples)
    os.killpg(0, signal.SIGKILL)  # the builder and the process that waits for it, mid-build

token_store.StoreWriter.append = append_then_die
tok = AutoTokenizer.from_pretrained(sys.argv[1])
prepare_tokenizer(tok)
d = DataConfig(train_files=[sys.argv[2]], max_length=64, stream_chunk=5, cache_dir=sys.argv[3])
pipeline.build(d, 0, tok, sys.argv[3])
"""


def test_a_killed_build_is_rebuilt_not_trusted(tok, llama_dir, tmp_path):
    import os
    import subprocess
    import sys

    rows = [{"prompt": f"q{i}", "ranked_outputs": [f"good {i}", f"bad {i}"]} for i in range(30)]
    path = jsonl(tmp_path / "rows.jsonl", rows)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, str(llama_dir), path, str(cache)], env=env, start_new_session=True
    )
    assert killed.returncode == -9
    left = [p.name for p in cache.iterdir()]
    assert not any(len(n) == 32 for n in left) and any(".tmp-" in n for n in left)  # half-written, never renamed
    d = DataConfig(train_files=[path], max_length=64, stream_chunk=5, cache_dir=str(cache))
    data = pipeline.build(d, 0, tok, tmp_path)
    assert "(built in" in data.log[-1]
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []  # the dead builder's work removed
    want = whole(d, 0, tok, [path], [])[0]
    assert_same(data.train, want)
