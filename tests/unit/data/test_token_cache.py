"""Tokenise once, cache, memory-map: the batched path against the per-sequence one, the cache's key, torn caches,
one builder among many processes."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from bigrm.config import Config, DataConfig
from bigrm.data import pipeline, token_cache, token_store
from bigrm.data.rows import load_examples
from bigrm.data.sequences import EncodeReport, scored_sequence
from bigrm.data.tokenise import tokenize_examples
from bigrm.data.tokenizer import prepare_tokenizer
from tests.helpers.paths import HH_DATA


def build(cfg: Config, tokenizer, directory) -> pipeline.Dataset:
    return pipeline.build(cfg.data, cfg.train.seed, tokenizer, directory)


@pytest.fixture(scope="module")
def tok(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    prepare_tokenizer(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def qwen():
    from tests.helpers.real_tokenizers import qwen2_tokenizer

    tokenizer = qwen2_tokenizer()
    prepare_tokenizer(tokenizer)
    return tokenizer


def per_sequence(examples, tokenizer, max_length: int, convention: str = "trl"):
    """The obviously-correct reference: one tokenizer call per completion, the prompt cut rule of scored_sequence."""
    kept, report = [], EncodeReport()
    for ex in examples:
        scored = [scored_sequence(tokenizer, ex.prompt, c, max_length, convention) for c in ex.completions]
        if any(isinstance(s, int) for s in scored):
            report.skipped[f"completion alone longer than data.max_length={max_length}"] += 1
            continue
        report.prompts_cut += sum(s.cut > 0 for s in scored)
        report.prompt_tokens_cut += sum(s.cut for s in scored)
        kept.append((ex.source, [s.ids for s in scored], ex.labels))
    report.groups, report.sequences = len(kept), sum(len(s) for _, s, _ in kept)
    report.tokens = sum(len(i) for _, s, _ in kept for i in s)
    return kept, report


def same(groups, reference) -> bool:
    return [(g.source, [s.tolist() for s in g.seqs], g.labels) for g in groups] == reference


@pytest.mark.skipif(not HH_DATA.exists(), reason="needs the HH data in ../shared/data")
def test_batched_workers_equal_per_sequence_on_hh(qwen, tmp_path):
    cfg = Config()
    cfg.data = replace(cfg.data, train_files=[str(HH_DATA)], max_length=96, overlong="skip", skip_invalid=True)
    cfg.data = replace(cfg.data, num_proc=2, cache_dir=str(tmp_path))
    (examples,), load_report = load_examples([str(HH_DATA)], cfg.data)
    reference, report = per_sequence(examples, qwen, 96)
    assert report.prompts_cut and report.skipped and load_report.skipped  # every rule is exercised
    data = build(cfg, qwen, tmp_path)
    assert same(data.train, reference)
    assert data.log[:-1] == [
        f"train data: {load_report.summary()}",
        "eval data: none (set data.eval_files or data.eval_fraction)",
        f"train tokens: {report.summary()}",
    ]
    groups, got = tokenize_examples(examples[:300], qwen, 96, "skip", num_proc=1)  # in this process
    assert same(groups, reference[: len(groups)]) and got.prompts_cut


def test_batched_equals_per_sequence_on_chat_rows(qwen):
    from tests.helpers.real_tokenizers import hh_chat_pairs

    rows = hh_chat_pairs(60)
    path = Path(os.environ["BIGRM_CACHE_DIR"]).parent / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (examples,), _ = load_examples([str(path)], DataConfig())
    for convention in ("trl", "openrlhf"):
        reference, report = per_sequence(examples, qwen, 120, convention)
        assert report.prompts_cut
        groups, got = tokenize_examples(examples, qwen, 120, "skip", convention, num_proc=2)
        assert same(groups, reference) and got.summary() == report.summary()


def config(path: str, **data) -> Config:
    cfg = Config()
    cfg.data = replace(cfg.data, train_files=[path], **{"max_length": 64, **data})
    return cfg


def write(path: Path, n: int, word: str = "good") -> str:
    rows = [{"prompt": f"q{i}", "ranked_outputs": [f"{word} answer {i}", f"so-so {i}", f"bad {i}"]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def how(data: pipeline.Dataset) -> str:
    return data.log[-1].rsplit("(", 1)[1].split()[0]  # "built" or "reused"


def test_the_cache_is_reused_until_an_input_that_decides_the_tokens_changes(tmp_path, tok):
    path = write(tmp_path / "a.jsonl", 12)
    fresh = build(config(path, cache=False), tok, tmp_path)
    first = build(config(path), tok, tmp_path)
    assert how(first) == "built" and first.log[:-1] == fresh.log
    assert same(first.train, [(g.source, [s.tolist() for s in g.seqs], g.labels) for g in fresh.train])
    tokens = first.train.a["tokens"]
    assert isinstance(tokens.base, np.memmap) and not tokens.flags.writeable and tokens.dtype == np.int32
    # what only says how to build, or a seed with nothing held out, reuses it
    assert how(build(config(path, num_proc=1), tok, tmp_path)) == "reused"
    assert how(build(replace(config(path), train=replace(Config().train, seed=7)), tok, tmp_path)) == "reused"
    # every data option that changes the tokens rebuilds
    for changed in ({"max_length": 32}, {"reward_convention": "grpo"}, {"overlong": "skip"}, {"skip_invalid": True}):
        assert how(build(config(path, **changed), tok, tmp_path)) == "built", changed
    # an edit of the file that keeps its size and modification time still rebuilds: the key is its content
    stat = os.stat(path)
    write(Path(path), 12, word="fine")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    # (which rows `datasets` then reads for it is data.read_rows' business: its own cache keys by path and mtime)
    assert how(build(config(path), tok, tmp_path)) == "built"
    # another tokenizer rebuilds
    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    prepare_tokenizer(other)
    assert how(build(config(path), other, tmp_path)) == "reused"  # the same tokenizer, loaded again
    other.add_tokens(["fine"])
    assert how(build(config(path), other, tmp_path)) == "built"


def test_a_torn_cache_is_rebuilt_and_a_dead_builders_leftovers_ignored(tmp_path, tok):
    cfg = config(write(tmp_path / "a.jsonl", 8), cache_dir=str(tmp_path / "cache"))
    built = build(cfg, tok, tmp_path)
    directory = Path(built.log[-1].split("token cache: ")[1].split(" (")[0])
    expected = [s.tolist() for g in built.train for s in g.seqs]
    tokens = directory / "train" / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-8])  # a copy cut short
    (tmp_path / "cache" / f".{directory.name}.tmp-999999").mkdir()  # a builder that died half-way
    again = build(cfg, tok, tmp_path)
    assert how(again) == "built" and [s.tolist() for g in again.train for s in g.seqs] == expected
    assert not list((tmp_path / "cache").glob(".*tmp*"))
    (directory / token_cache.MARK).unlink()  # renamed into place, but never marked complete
    assert how(build(cfg, tok, tmp_path)) == "built"


def cached(data: pipeline.Dataset) -> Path:
    return Path(data.log[-1].split("token cache: ")[1].split(" (")[0])


@pytest.mark.parametrize("array", ["tokens", "ranks"])
def test_an_entry_damaged_in_place_is_rebuilt_with_one_line(tmp_path, tok, array):
    """The audit's cases, same size: token ids changed, and every prompt's ranks reversed (which trained on reversed
    preferences, step-1 tau -0.24 instead of +0.24, with exit 0)."""
    cfg = config(write(tmp_path / "a.jsonl", 8), cache_dir=str(tmp_path / "cache"))
    first = build(cfg, tok, tmp_path)
    expected = [(g.source, [s.tolist() for s in g.seqs], g.labels) for g in first.train]
    f = cached(first) / "train" / f"{array}.npy"
    header = len(f.read_bytes()) - first.train.a[array].nbytes
    values = np.load(f)
    np.save(f, values[::-1] if array == "tokens" else values.max() - values)  # same shape and dtype: same size
    assert len(f.read_bytes()) - header == first.train.a[array].nbytes and not np.array_equal(np.load(f), values)
    again = build(cfg, tok, tmp_path)
    notes = [line for line in again.log if "a damaged entry" in line]
    assert notes == [f"token cache: rebuilt a damaged entry: {f} is not the file saved (its content hash differs)"]
    assert how(again) == "built" and same(again.train, expected)
    assert how(build(cfg, tok, tmp_path)) == "reused"


def test_a_cache_directory_that_cannot_be_used_is_one_line(tmp_path, tok, monkeypatch):
    """Not a directory, not creatable, not writable (no lock can be taken), a disk that fills while building (the
    builder's np.save: numpy's "requested and written" OSError); nothing torn is left."""
    import errno

    from bigrm.errors import ConfigError

    (tmp_path / "file").write_text("x")
    path = write(tmp_path / "a.jsonl", 4)
    for where, words in (
        (tmp_path / "file", "is a file; give a directory"),
        (tmp_path / "file" / "sub", "cannot create"),
    ):
        with pytest.raises(ConfigError, match=rf"^data.cache_dir {where}: {words}.*\(or set data.cache false\)$"):
            build(config(path, cache_dir=str(where)), tok, tmp_path)

    def refused(name, mode="r", *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", name)

    monkeypatch.setattr(token_cache, "open", refused, raising=False)
    with pytest.raises(ConfigError, match="^data.cache_dir: cannot write in .*Permission denied"):
        build(config(path, cache_dir=str(tmp_path / "ro")), tok, tmp_path)
    monkeypatch.undo()

    def full(*args, **kwargs):
        raise OSError("123 requested and 0 written")

    monkeypatch.setattr(token_store.StoreWriter, "_write", full)  # what appends every array of the store
    with pytest.raises(ConfigError, match="cannot write the token cache in .*123 requested and 0 written: free space"):
        build(config(path, cache_dir=str(tmp_path / "full")), tok, tmp_path)
    assert [p.suffix for p in (tmp_path / "full").iterdir()] == [".lock"]


def _build_once(root: str, log: str, barrier) -> None:
    def build(tmp: Path) -> dict:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # long enough for every other process to find the lock taken
        (tmp / "x").write_text("done")
        return {"by": os.getpid()}

    barrier.wait()
    directory, _, _ = token_cache.get_or_build(Path(root), "key", build)
    assert (directory / "x").read_text() == "done"


def test_one_process_builds_while_the_others_poll(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    procs = [context.Process(target=_build_once, args=(tmp_path, tmp_path / "log", barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len((tmp_path / "log").read_text().split()) == 1


def test_a_waiting_process_holds_no_collective_and_proceeds_when_the_lock_frees(tmp_path, tok):
    cfg = config(write(tmp_path / "a.jsonl", 4), cache_dir=str(tmp_path / "cache"))
    key = pipeline.cache_key(cfg.data, cfg.train.seed, tok, cfg.data.train_files, [])
    (tmp_path / "cache").mkdir()
    holder = open(tmp_path / "cache" / f"{key}.lock", "w")
    fcntl.flock(holder, fcntl.LOCK_EX)
    result = {}
    waiter = threading.Thread(target=lambda: result.update(data=build(cfg, tok, tmp_path)))
    waiter.start()
    waiter.join(1.5)
    assert waiter.is_alive()  # polling for the lock
    holder.close()
    waiter.join(30)
    assert how(result["data"]) == "built"


@pytest.mark.skipif(not HH_DATA.exists(), reason="needs the HH data in ../shared/data")
@pytest.mark.parametrize("family", ["qwen2", "llama2", "llama3"])
def test_the_backend_call_equals_the_tokenizer_call(family):
    """encode_batch reads the fast backend and asks for the completion's first token instead of every offset: the
    ids `tokenizer(text, ...)` gives, and as prompt tokens those whose offsets end at or before the completion."""
    from bigrm.data.sequences import _tokenize, encode_batch, render
    from tests.helpers import real_tokenizers

    tokenizer = getattr(real_tokenizers, f"{family}_tokenizer")()
    (examples,), _ = load_examples([str(HH_DATA)], DataConfig(skip_invalid=True))
    texts = [e.prompt + c for e in examples[:100] for c in e.completions]
    starts = [len(e.prompt) for e in examples[:100] for _ in e.completions]
    texts.append(texts[0])  # an empty completion: no token holds its first character
    starts.append(len(texts[0]))
    for e in examples[:20]:  # chat renderings: the template's special tokens sit inside the text
        prompt = [{"role": "user", "content": e.prompt.strip()}]
        rendered = [render(tokenizer, prompt, c) for c in e.completions]
        texts += [text for text, _ in rendered]
        starts += [start for _, start in rendered]
    for add_special in (True, False):
        expected = [tokenizer(t, add_special_tokens=add_special, return_offsets_mapping=True) for t in texts]
        got = _tokenize(tokenizer, texts, add_special)
        assert [(e.ids, e.offsets) for e in got] == [
            (e["input_ids"], [tuple(o) for o in e["offset_mapping"]]) for e in expected
        ]
        convention = "trl" if add_special else "grpo"
        lean = encode_batch(tokenizer, texts, starts, [False] * len(texts), convention, with_ends=False)
        full = encode_batch(tokenizer, texts, starts, [False] * len(texts), convention)
        for e, s, a, b in zip(expected, starts, lean, full, strict=True):
            reference = sum(1 for _, end in e["offset_mapping"] if end <= s)
            assert a.prompt_end == b.prompt_end == max(reference, b.n_lead)
            assert a.ids == b.ids and a.n_lead == b.n_lead and a.ends is None


def _dies(sig: int):
    def build(tmp: Path) -> dict:
        (tmp / "half").write_text("written before the kill")
        os.kill(os.getpid(), sig)
        time.sleep(30)
        return {}

    return build


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_killed_builder_is_one_line_and_nothing_of_it_is_kept(tmp_path, sig):
    """Under the trainer's signal handlers too: a SIGTERM to the builder was handed back as the trainer's own stop
    (`stopped by SIGTERM`), a SIGKILL was a RuntimeError's traceback."""
    import signal

    from bigrm.errors import ProcessDied
    from bigrm.training import preemption

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    preemption.terminate_on_signals()
    try:
        with pytest.raises(ProcessDied, match=rf"^the token cache builder \(pid \d+\) was killed by {sig}: nothing"):
            token_cache.get_or_build(tmp_path, "key", _dies(getattr(signal, sig)))
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert [p.name for p in tmp_path.iterdir()] == ["key.lock"]
    _, built, _ = token_cache.get_or_build(tmp_path, "key", lambda tmp: {})  # the next run builds it
    assert built


def test_an_interrupt_while_building_ends_the_builder(tmp_path):
    import signal

    from bigrm.training import preemption

    pids = tmp_path / "pids"

    def slow(tmp: Path) -> dict:
        pids.write_text(str(os.getpid()))
        time.sleep(30)
        return {}

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    preemption.terminate_on_signals()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # a Ctrl-C
    timer.start()
    started = time.time()
    try:
        with pytest.raises(preemption.Terminated):
            token_cache.get_or_build(tmp_path / "cache", "key", slow)
    finally:
        timer.cancel()
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert time.time() - started < 10
    with pytest.raises(ProcessLookupError):
        os.kill(int(pids.read_text()), 0)  # gone, not still writing
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["key.lock"]
