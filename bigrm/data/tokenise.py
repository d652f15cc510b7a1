"""Validated examples → their scored token sequences, many at once: batched tokenizer calls (`scored_chunk`, what
training, evaluation and scoring all tokenise with), in forked worker processes when there are several chunks. What
one sequence is (render, encode_batch, fit) is bigrm.data.sequences'.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain

import numpy as np

from bigrm import progress
from bigrm.config import DataConfig
from bigrm.data.examples import Example
from bigrm.data.rows import listed
from bigrm.data.sequences import (
    EncodeReport,
    Group,
    Scored,
    Tokenized,
    _tokenize,
    encode_batch,
    fit,
    prompt_heads,
    render,
    split_sequence,
    step_positions,
)
from bigrm.errors import DataError, ProcessDied


def _too_long(max_length: int) -> str:
    return f"completion alone longer than data.max_length={max_length}"


def scored_chunk(
    examples: list[Example], tokenizer, max_length: int, convention: str, with_ends: bool = False
) -> list[list[Scored | int]]:
    """Every example's completions rendered, tokenised in one batch and `fit` to max_length (an int: the token count
    of a completion that alone does not fit), stepwise ones with their step positions (the trl step layout's laid
    out from ids by _split_chunk). Token ends are read (a Python tuple per token, costlier than the tokenising) only
    `with_ends` or for joined-layout stepwise examples."""
    every = examples
    split = _split_chunk([ex for ex in examples if ex.split_steps is not None], tokenizer, max_length)
    examples = [ex for ex in examples if ex.split_steps is None]
    texts, starts, chats = [], [], []
    for ex in examples:
        chat = isinstance(ex.prompt, list)
        heads = prompt_heads(tokenizer, ex.prompt) if chat else None
        for completion in ex.completions:
            text, start = render(tokenizer, ex.prompt, completion, heads)
            texts.append(text)
            starts.append(start)
            chats.append(chat)
    with_ends = with_ends or any(ex.step_ends is not None for ex in examples)
    encoded = zip(encode_batch(tokenizer, texts, starts, chats, convention, with_ends), texts, starts, strict=True)
    out = []
    for ex in every:
        if ex.split_steps is not None:
            out.append([next(split) for _ in ex.split_steps])
            continue
        seqs = []
        for k, completion in enumerate(ex.completions):
            seq = fit(*next(encoded), max_length)
            if ex.step_ends is not None and not isinstance(seq, int):
                seq = seq._replace(steps=step_positions(seq, completion, ex.step_ends[k], convention))
            seqs.append(seq)
        out.append(seqs)
    return out


def _split_chunk(examples: list[Example], tokenizer, max_length: int) -> Iterator[Scored | int]:
    """Each stepwise example's solutions in the trl step layout (split_sequence), in order, the prompts and steps
    tokenised in one batch."""
    prompts = [p if isinstance(p, str) else prompt_heads(tokenizer, p)[0] for p in (ex.prompt for ex in examples)]
    steps = [s.steps for ex in examples for s in ex.split_steps]
    encoded = iter(_tokenize(tokenizer, prompts + list(chain.from_iterable(steps)), add_special=False))
    prompt_ids = [next(encoded).ids for _ in prompts]
    separators = {s.separator for ex in examples for s in ex.split_steps}
    separator_ids = {s: tokenizer.encode(s, add_special_tokens=False) for s in separators}
    for ex, ids in zip(examples, prompt_ids, strict=True):
        for solution in ex.split_steps:
            step_ids = [next(encoded).ids for _ in solution.steps]
            yield split_sequence(tokenizer, ex.prompt, ids, step_ids, separator_ids[solution.separator], max_length)


def tokenize_chunk(examples: list[Example], tokenizer, max_length: int, convention: str) -> Tokenized:
    """The examples' scored sequences laid flat; an example with a completion that cannot fit is left out whole."""
    report, kept_seqs, starts, kept, overlong = EncodeReport(), [], [], [], []
    step_counts, step_index, step_errors = [], [], []
    scored = scored_chunk(examples, tokenizer, max_length, convention)
    for i, (ex, seqs) in enumerate(zip(examples, scored, strict=True)):
        # unusable steps stop the run even in an example left out as overlong
        step_errors += [
            f"{ex.source}: completion {k}: {s.steps}"
            for k, s in enumerate(seqs)
            if not isinstance(s, int) and isinstance(s.steps, str)
        ]
        bad = next(((k, s) for k, s in enumerate(seqs) if isinstance(s, int)), None)
        if bad is not None:
            overlong.append(f"{ex.source}: completion {bad[0]}: {bad[1]} tokens")
            report.skipped[_too_long(max_length)] += 1
            continue
        report.prompts_cut += sum(s.cut > 0 for s in seqs)
        report.prompt_tokens_cut += sum(s.cut for s in seqs)
        kept.append(i)
        kept_seqs += [s.ids for s in seqs]
        starts += [s.completion_start for s in seqs]
        if ex.step_ends is None:
            step_counts += [0] * len(seqs)
        else:
            steps = [np.zeros(0, dtype=np.int64) if isinstance(s.steps, str) else s.steps for s in seqs]
            step_counts += [len(s) for s in steps]
            step_index += steps
    lengths = np.fromiter(map(len, kept_seqs), dtype=np.int64, count=len(kept_seqs))
    return Tokenized(
        # token ids are below 2**32: half the bytes workers send back
        np.fromiter(chain.from_iterable(kept_seqs), dtype=np.uint32, count=int(lengths.sum())),
        lengths,
        np.asarray(starts, dtype=np.int64),
        np.asarray(kept, dtype=np.int64),
        report,
        overlong,
        np.asarray(step_counts, dtype=np.int64),
        np.concatenate(step_index) if step_index else np.zeros(0, dtype=np.int64),
        step_errors,
    )


CHUNK = 256  # examples per batched tokenizer call (and per task of the worker processes)
TOKENISE = ("tokenise", f"x{CHUNK} prompts")  # the progress counter's name and unit
_forked: tuple = ()  # (examples, tokenizer, max_length, convention): what forked workers inherit, never pickled


def _init_worker() -> None:
    # the workers are the parallelism: a tokenizer's own thread pool in each would only oversubscribe the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    end_with_parent()
    # forked with the trainer's handlers (bigrm.training.preemption), a worker would raise on the SIGTERM that ends
    # the pool, possibly holding the task queue's lock, and leave the parent waiting for ever; an interrupt is the
    # parent's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def end_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux): a builder killed from outside leaves no worker behind,
    waiting on a task queue that no one fills."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: no such switch
        pass


def _tokenize_in_worker(lo: int) -> Tokenized:
    examples, tokenizer, max_length, convention = _forked
    return tokenize_chunk(examples[lo : lo + CHUNK], tokenizer, max_length, convention)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def encode_examples(
    examples: list[Example],
    tokenizer,
    max_length: int,
    overlong: str,
    convention: str = DataConfig.reward_convention,
    max_errors: int = DataConfig.max_errors,
    num_proc: int = 1,
) -> Tokenized:
    """Every example's scored sequences, tokenised in batches by `num_proc` processes (forked: they inherit the
    tokenizer); the same sequences, counts and errors whatever `num_proc`."""
    done = encode_unchecked(examples, tokenizer, max_length, convention, num_proc)
    check_fit(done.overlong, done.step_errors, overlong, max_length, max_errors)
    return done


def check_fit(
    overlong_errors: list[str],
    step_errors: list[str],
    overlong: str,
    max_length: int,
    max_errors: int,
    totals: tuple[int, int] | None = None,
) -> None:
    """Raises for the completions that cannot fit (unless data.overlong skips them) or whose steps cannot be
    trained; `totals` counts each kind where the lists are only the first ones."""
    n_overlong, n_steps = totals or (len(overlong_errors), len(step_errors))
    if n_overlong and overlong == "error":
        reason = _too_long(max_length)
        raise DataError(
            f"{n_overlong} row(s) have a completion that cannot fit (set data.overlong: skip to drop them, or raise "
            f"data.max_length):{listed([f'{e}, {reason}' for e in overlong_errors], max_errors, n_overlong)}"
        )
    if n_steps:
        raise DataError(
            f"{n_steps} stepwise completion(s) cannot be trained:{listed(step_errors, max_errors, n_steps)}"
        )


def encode_unchecked(
    examples: list[Example], tokenizer, max_length: int, convention: str, num_proc: int, counter=None
) -> Tokenized:
    """encode_examples without its checks: what cannot fit or be trained is in `overlong` and `step_errors`;
    `counter` (a progress bar) counts the chunks, or a bar of their own."""
    if tokenizer.eos_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise DataError(
            "the tokenizer's pad token equals its EOS token; bigrm.data.tokenizer.prepare_tokenizer fixes that"
        )
    global _forked
    chunks = [examples[lo : lo + CHUNK] for lo in range(0, len(examples), CHUNK)]
    own = counter is None
    counter = progress.bar(len(chunks), *TOKENISE) if own else counter
    try:
        if num_proc > 1 and len(chunks) > 1:
            _forked = (examples, tokenizer, max_length, convention)
            parts = _in_workers(len(examples), min(num_proc, len(chunks)), counter)
        else:
            parts = [tokenize_chunk(c, tokenizer, max_length, convention) for c in _counted(chunks, counter)]
    finally:
        _forked = ()
        if own:
            counter.close()
    return _joined(parts, [len(c) for c in chunks])


def _in_workers(n: int, workers: int, counter) -> list[Tokenized]:
    """The forked workers' results for _forked's n examples, CHUNK at a time, in order."""
    # an executor, not a multiprocessing.Pool: a Pool whose worker is killed waits for its task for ever
    fork = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, mp_context=fork, initializer=_init_worker)
    try:
        return list(_counted(pool.map(_tokenize_in_worker, range(0, n, CHUNK)), counter))
    except BrokenProcessPool:
        raise ProcessDied("a tokenising worker process was killed (by a signal, or out of memory?)") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # an interrupt waits for the chunks begun only


def _counted(items, counter) -> Iterator:
    """The items, each counted by `counter` as it is consumed."""
    for item in items:
        yield item
        counter.update(1)


def _joined(parts: list[Tokenized], sizes: list[int]) -> Tokenized:
    """The chunks' results as one, their kept indices shifted by the chunks before."""
    report, errors, offset = EncodeReport(), [], 0
    for part, size in zip(parts, sizes, strict=True):
        report.add(part.report)  # its cuts and skips: what it kept is counted below
        errors += part.overlong
        part.kept += offset
        offset += size
    step_errors = [e for p in parts for e in p.step_errors]
    lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    starts = np.concatenate([p.starts for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    tokens = np.concatenate([p.tokens for p in parts]) if parts else np.zeros(0, dtype=np.uint32)
    report.groups = sum(len(p.kept) for p in parts)
    report.sequences = len(lengths)
    report.tokens = len(tokens)
    kept = np.concatenate([p.kept for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    step_counts = np.concatenate([np.zeros(0, dtype=np.int64)] + [p.step_counts for p in parts])
    step_index = np.concatenate([np.zeros(0, dtype=np.int64)] + [p.step_index for p in parts])
    return Tokenized(tokens, lengths, starts, kept, report, errors, step_counts, step_index, step_errors)


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    max_length: int,
    overlong: str,
    convention: str = DataConfig.reward_convention,
    max_errors: int = DataConfig.max_errors,
    num_proc: int = 1,
) -> tuple[list[Group], EncodeReport]:
    """encode_examples as Groups, whose int64 sequences are views of one flat array."""
    done = encode_examples(examples, tokenizer, max_length, overlong, convention, max_errors, num_proc)
    bounds = np.concatenate([[0], np.cumsum(done.lengths)])
    step_bounds = np.concatenate([[0], np.cumsum(done.step_counts)])
    tokens = done.tokens.astype(np.int64)
    groups, s = [], 0
    for i in done.kept:
        ex = examples[i]
        k = len(ex.completions)
        steps = None
        if ex.step_ends is not None:
            steps = tuple(done.step_index[step_bounds[j] : step_bounds[j + 1]] for j in range(s, s + k))
        seqs = tuple(tokens[bounds[j] : bounds[j + 1]] for j in range(s, s + k))
        groups.append(Group(seqs, ex.source, ex.labels, steps, tuple(done.starts[s : s + k].tolist())))
        s += k
    return groups, done.report
