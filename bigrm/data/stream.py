"""Files → the train and eval token stores on disk, data.stream_chunk rows at a time: the data phase's build.

Two passes over the files. The first reads and validates every row (row_chunks) and keeps only what the whole data
decides, on disk: each file's scores (their standardisation's mean and std, rows.score_moments) and each example's
prompt hash (the hold-out by prompt). The second reads and parses the rows again, tokenises each chunk's examples in
the forked workers (tokenise.encode_unchecked) and appends them to the stores (token_store.StoreWriter). The
builder's memory is a chunk's, not the data's; what it writes — ids, order, labels, the hold-out, the report and every
error, raised in the same order — is what reading every file whole and tokenising it at once gives (rows.load_examples,
then tokenise.encode_examples per file and for the eval set). Stepwise files are grouped by prompt
(rows.group_solutions) and so held whole, as are files other than JSON Lines (see row_chunks).
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from bigrm import progress
from bigrm.config import DataConfig
from bigrm.data.examples import Example, RowError
from bigrm.data.row_chunks import ChunkedFile
from bigrm.data.rows import LoadReport, group_solutions, listed, prompt_key, score_moments, standardised
from bigrm.data.sequences import EncodeReport
from bigrm.data.token_store import StoreWriter
from bigrm.data.tokenise import TOKENISE, check_fit, default_workers, encode_unchecked
from bigrm.errors import DataError

SPILL = ".scan"  # the first pass's files, inside the directory being built, removed when it is done


class Spill:
    """Values appended to a file and read back in order: a sequence too long to keep in memory."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.fh = path.open("wb")

    def add(self, values) -> None:
        a = np.asarray(values, dtype=self.dtype)
        self.fh.write(a.tobytes())
        self.n += len(a)

    def __len__(self) -> int:
        return self.n

    def close(self) -> None:
        self.fh.close()
        self.path.unlink()

    def array(self) -> np.ndarray:
        self.fh.flush()
        return np.memmap(self.path, self.dtype, "r", shape=(self.n,)) if self.n else np.zeros(0, self.dtype)

    def __iter__(self) -> Iterator:
        a = self.array()
        for lo in range(0, self.n, 1 << 16):
            yield from a[lo : lo + (1 << 16)].tolist()


@dataclass
class Scanned:
    """What the first pass keeps of a file."""

    file: ChunkedFile
    moments: tuple[float, float] | None = None  # (mean, std) of its scores
    held: np.ndarray | None = None  # per example: whether its prompt is held out
    held_prompts: int = 0


class Invalid:
    """The row errors of a set of files: the first data.max_errors, how many, and the report's counts by reason."""

    def __init__(self, max_errors: int):
        self.first: list[RowError] = []
        self.count, self.max = 0, max_errors
        self.report = LoadReport(skipped=Counter())

    def add(self, errors: list[RowError]) -> None:
        self.first += errors[: max(self.max - len(self.first), 0)]
        self.count += len(errors)
        self.report.skipped.update(f"{e.field}: {e.reason}" for e in errors)


def examples(file: ChunkedFile, d: DataConfig, invalid: Invalid | None = None) -> Iterator[list[Example]]:
    """The file's valid examples a chunk at a time (a stepwise file's all at once, grouped), errors to `invalid`."""
    grouped = []
    for part in file.parts(d.stream_chunk):
        parsed = [part.parse(i, d) for i in range(len(part.rows))]
        if invalid is not None:
            invalid.add([p for p in parsed if isinstance(p, RowError)])
            invalid.report.rows += len(parsed)
        good = [p for p in parsed if not isinstance(p, RowError)]
        if file.fmt == "stepwise":
            grouped += good
        else:
            yield good
    if file.fmt == "stepwise":
        yield group_solutions(grouped, d.step_group_size)


def scan(paths: list[str], d: DataConfig, work: Path, rng: random.Random | None) -> tuple[list[Scanned], LoadReport]:
    """The first pass over the files (with `rng`, the hold-out's, each example's prompt hash); raises for invalid rows
    as rows.load_examples does."""
    invalid, scanned = Invalid(d.max_errors), []
    for i, path in enumerate(paths):
        s = Scanned(ChunkedFile(path, d))
        scores, keys = Spill(work / f"scores-{i}", np.float64), Spill(work / f"keys-{i}", "V16")
        counter = progress.bar(None, f"validate {Path(path).name}", unit="row")
        for chunk in examples(s.file, d, invalid):
            scores.add([v for e in chunk if e.labels.scores for v in e.labels.scores])
            if rng is not None:
                keys.add(
                    np.frombuffer(b"".join(xxhash.xxh3_128_digest(prompt_key(e.prompt).encode()) for e in chunk), "V16")
                )
            counter.update(len(chunk))
        counter.close()
        s.moments = score_moments(scores) if len(scores) else None
        if rng is not None:
            s.held, s.held_prompts = held_out(keys.array(), d.eval_fraction, rng)
        scores.close()
        keys.close()
        scanned.append(s)
    if invalid.count and not d.skip_invalid:
        raise DataError(
            f"{invalid.count} invalid row(s) (set data.skip_invalid: true to skip them):"
            + listed(invalid.first, d.max_errors, invalid.count)
        )
    return scanned, invalid.report


def held_out(keys: np.ndarray, fraction: float, rng: random.Random) -> tuple[np.ndarray, int]:
    """(per example (`keys`: its prompt's hash) whether its prompt is held out, how many prompts are):
    round(fraction × prompts), the first of a seeded shuffle of the prompts in order of first appearance (every row
    of a prompt on one side, so no eval prompt is trained on)."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))  # each prompt's place in order of first appearance
    order = np.arange(len(first))
    rng.shuffle(order)  # random.shuffle's swaps, as on the list of prompts
    held = np.zeros(len(first), dtype=bool)
    held[order[: round(fraction * len(first))]] = True
    return held[rank[inverse.reshape(-1)]], int(held.sum())


class Encoding:
    """One file's (or the eval set's) tokenisation into a store, a chunk at a time: encode_examples' report and
    errors over all its chunks."""

    def __init__(self, writer: StoreWriter, d: DataConfig, tokenizer, counter):
        self.writer, self.d, self.tokenizer, self.counter = writer, d, tokenizer, counter
        self.report, self.examples = EncodeReport(), 0
        self.overlong: list[str] = []
        self.steps: list[str] = []
        self.totals = [0, 0]

    def add(self, examples: list[Example]) -> None:
        if not examples:
            return
        d = self.d
        done = encode_unchecked(
            examples, self.tokenizer, d.max_length, d.reward_convention, d.num_proc or default_workers(), self.counter
        )
        self.report.add(done.report)
        self.examples += len(examples)
        for kept, found, i in ((self.overlong, done.overlong, 0), (self.steps, done.step_errors, 1)):
            kept += found[: max(d.max_errors - len(kept), 0)]
            self.totals[i] += len(found)
        self.writer.append(done, examples)

    def check(self) -> None:
        d = self.d
        check_fit(self.overlong, self.steps, d.overlong, d.max_length, d.max_errors, tuple(self.totals))


def blocks(s: Scanned, d: DataConfig) -> Iterator[tuple[list[Example], np.ndarray]]:
    """The second pass over a file: its examples, scores standardised, up to data.stream_chunk at a time, each with
    whether it is held out."""
    done = 0
    for chunk in examples(s.file, d):
        chunk = standardised(chunk, *s.moments) if s.moments else chunk
        for lo in range(0, len(chunk), d.stream_chunk):
            block = chunk[lo : lo + d.stream_chunk]
            held = s.held[done : done + len(block)] if s.held is not None else np.zeros(len(block), dtype=bool)
            done += len(block)
            yield block, held


def build(d: DataConfig, seed: int, tokenizer, paths: list[str], eval_paths: list[str], directory: Path) -> dict:
    """Validation, hold-out (seeded by `seed`) and tokenisation into directory/train and directory/eval (token
    stores); returns {"train_file_groups": groups per file, "log": report, "attribute_stats" with attributes}."""
    work = directory / SPILL
    work.mkdir(parents=True)
    try:
        return _build(d, seed, tokenizer, paths, eval_paths, directory, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build(d, seed, tokenizer, paths, eval_paths, directory: Path, work: Path) -> dict:
    hold_out = not eval_paths and d.eval_fraction > 0
    train_files, report = scan(paths, d, work, random.Random(seed) if hold_out else None)
    log = [f"train data: {report.summary()}"]
    eval_files = []
    if eval_paths:
        eval_files, eval_report = scan(eval_paths, d, work, None)
        log.append(f"eval data: {eval_report.summary()}")
    elif hold_out:
        held = sum(int(s.held.sum()) for s in train_files)
        prompts = sum(s.held_prompts for s in train_files)
        log.append(f"eval data: {prompts} prompts held out ({held} groups; data.eval_fraction={d.eval_fraction})")
    else:
        log.append("eval data: none (set data.eval_files or data.eval_fraction)")
    counter = progress.bar(None, *TOKENISE)
    train_writer, eval_writer = (StoreWriter(directory / n, len(d.attributes)) for n in ("train", "eval"))
    evals = Encoding(eval_writer, d, tokenizer, counter)
    ratings = Spill(work / "ratings", np.float64)
    groups = []
    for s in train_files:
        train = Encoding(train_writer, d, tokenizer, counter)
        for block, held in blocks(s, d):
            kept = [e for e, h in zip(block, held, strict=True) if not h]
            train.add(kept)
            evals.add([e for e, h in zip(block, held, strict=True) if h])
            ratings.add(ratings_of(kept))
        train.check()
        log.append(f"train tokens: {train.report.summary()}")
        groups.append(train.report.groups)
    if not sum(groups):
        raise DataError("no training prompts left after validation")
    for s in eval_files:
        for block, _ in blocks(s, d):
            evals.add(block)
    evals.check()
    counter.close()
    if evals.examples:
        log.append(f"eval tokens: {evals.report.summary()}")
    train_writer.close()
    eval_writer.close()
    meta = {"train_file_groups": groups, "log": log}
    if d.attributes:  # the targets' scale: every training rating, before files are mixed by weight
        meta["attribute_stats"] = rating_stats(ratings.array().reshape(-1, len(d.attributes)))
    ratings.close()
    return meta


def ratings_of(examples: list[Example]) -> list[float]:
    """The examples' attribute ratings end to end: a row of data.attributes ratings per completion."""
    return [r for e in examples for per_completion in (e.labels.attributes or ()) for r in per_completion]


def rating_stats(ratings: np.ndarray) -> dict:
    """{"mean", "std"}: per attribute (a column of `ratings`, NaN where absent), over its present ratings (std 1 where
    they are constant or absent, mean 0 where absent, so targets stay finite)."""
    mean, std = [], []
    for a in range(ratings.shape[1]):
        present = ratings[~np.isnan(ratings[:, a]), a]
        mean.append(float(present.mean()) if len(present) else 0.0)
        spread = float(present.std()) if len(present) else 0.0
        std.append(spread if spread > 0 else 1.0)
    return {"mean": mean, "std": std}
