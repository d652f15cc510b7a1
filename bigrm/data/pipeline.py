"""Data options → tokenised train/eval groups: files (or the synthetic task), validation, hold-out, tokenisation.

Runs entirely before the model is built, so bad data fails before any compute is spent. `bigrm prepare --config …`
runs it ahead of training (`prepare`, e.g. on a CPU node before the GPU job): it fills the token cache (data.cache)
that a training run with the same options then memory-maps, and prints the same report.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigrm.builtin import synthetic, synthetic_attributes
from bigrm.config import Config, DataConfig, attribute_weights
from bigrm.data import stream, token_cache
from bigrm.data.packing import check_budget
from bigrm.data.rows import file_specs
from bigrm.data.sequences import Group
from bigrm.data.token_store import TokenStore
from bigrm.data.tokenizer import add_step_token, load_tokenizer
from bigrm.errors import ConfigError, DataError


@dataclass
class Dataset:
    train: Sequence[Group]  # a TokenStore (memory-mapped when cached) or any list of groups
    train_files: list[list[int]]  # group indices of each training file, for per-epoch mixing
    weights: list[float]
    eval: Sequence[Group]
    log: list[str] = field(default_factory=list)
    attribute_stats: dict | None = None  # with data.attributes: rating_stats of the training ratings
    stepwise: bool = False  # some training prompts are stepwise (a process reward model)


def synthetic_paths(out_dir: Path, d: DataConfig) -> tuple[list[Path], Path | None]:
    """(training files, eval file) of the built-in task: the attributes task adds a file of unrated ranked rows."""
    train = [out_dir / "synthetic-train.jsonl"]
    if d.synthetic.task == "attributes":
        train.append(out_dir / "synthetic-train-ranked.jsonl")
    return train, out_dir / "synthetic-eval.jsonl" if d.synthetic.num_eval else None


def write_synthetic(d: DataConfig, out_dir: Path, seed: int, weights: tuple[float, ...] = ()) -> None:
    """The built-in task as JSON Lines files, so it takes the same path as user data; the attributes task ranks by
    the `weights` of its attributes (config.attribute_weights)."""
    s = d.synthetic
    train, held = synthetic_paths(out_dir, d)
    if s.task == "attributes":
        names, w = d.attributes, list(weights)
        files = [
            (train[0], synthetic_attributes.rated_rows(s.num_train, names, synthetic_attributes.MISSING, seed)),
            (train[1], synthetic_attributes.ranked_rows(s.num_train // 4, names, w, s.min_k, s.max_k, seed + 2, False)),
        ]
        if held:
            files.append(
                (held, synthetic_attributes.ranked_rows(s.num_eval, names, w, s.min_k, s.max_k, seed + 1, True))
            )
    elif s.task == "length":
        files = [(train[0], synthetic.make_length_rows(s.num_train, seed, s.length_bias, held_out=False))]
        if held:
            files.append((held, synthetic.make_length_rows(s.num_eval, seed + 1, s.length_bias, held_out=True)))
    elif s.task == "noisy":
        files = [(train[0], synthetic.make_noisy_rows(s.num_train, seed, s.noise, held_out=False))]
        if held:
            files.append((held, synthetic.make_noisy_rows(s.num_eval, seed + 1, s.noise, held_out=True)))
    else:
        make = synthetic.make_step_rows if s.task == "steps" else synthetic.make_rows
        files = [(train[0], make(s.num_train, s.min_k, s.max_k, seed))]
        if held:
            files.append((held, make(s.num_eval, s.min_k, s.max_k, seed + 1)))
    for path, rows in files:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def sources(d: DataConfig, synthetic_dir: Path) -> tuple[list[tuple[str, float]], list[str]]:
    """(training files with their weights, eval files): data.train_files / eval_files, or the synthetic files that
    write_synthetic put in synthetic_dir."""
    if d.train_files:
        return file_specs(d.train_files), [str(p) for p in d.eval_files]
    train_paths, eval_path = synthetic_paths(synthetic_dir, d)
    return [(str(p), 1.0) for p in train_paths], [str(eval_path)] if eval_path else []


def cache_key(d: DataConfig, seed: int, tokenizer, paths: list[str], eval_paths: list[str]) -> str:
    """Everything that decides the tokens: the files' contents and names (sources name them), the tokenizer, every
    data option (those that only say how to build are left out) and the hold-out's seed when there is one."""
    options = {k: v for k, v in asdict(d).items() if k not in ("cache", "cache_dir", "num_proc", "stream_chunk")}
    for path in [*paths, *eval_paths]:
        if not Path(path).exists():
            raise DataError(f"{path}: no such file or directory")
    return token_cache.key_of(
        {
            "format": CACHE_FORMAT,
            "train": [(p, token_cache.digest_file(Path(p))) for p in paths],
            "eval": [(p, token_cache.digest_file(Path(p))) for p in eval_paths],
            "data": options,
            "hold_out_seed": seed if d.eval_fraction > 0 and not eval_paths else None,
            "tokenizer": token_cache.digest_tokenizer(tokenizer),
        }
    )


CACHE_ENV = "BIGRM_CACHE_DIR"
CACHE_FORMAT = 6  # raised whenever what a cache holds, or how it is tokenised, changes


def cache_root(d: DataConfig) -> Path:
    return Path(os.path.expanduser(d.cache_dir or os.environ.get(CACHE_ENV, "~/.cache/bigrm/tokens")))


def build(d: DataConfig, seed: int, tokenizer, synthetic_dir: Path) -> Dataset:
    """The tokenised dataset: from the token cache (built by whichever process gets there first, see token_cache),
    or, with data.cache off, tokenised here."""
    specs, eval_paths = sources(d, synthetic_dir)
    paths = [p for p, _ in specs]
    if d.cache:
        started = time.perf_counter()
        key = cache_key(d, seed, tokenizer, paths, eval_paths)

        def write(tmp: Path) -> dict:
            return stream.build(d, seed, tokenizer, paths, eval_paths, tmp)

        directory, built, damaged = token_cache.get_or_build(cache_root(d), key, write)
        meta = token_cache.read_complete(directory)["meta"]
        train, evals = TokenStore.load(directory / "train"), TokenStore.load(directory / "eval")
        how = "built" if built else "reused"
        log = [*meta["log"], *([f"token cache: rebuilt a damaged entry: {damaged}"] if damaged else [])]
        log.append(f"token cache: {directory} ({how} in {time.perf_counter() - started:.1f} s)")
    else:  # built as for the cache, then read into memory
        with tempfile.TemporaryDirectory(prefix="bigrm-tokens-") as tmp:
            meta = stream.build(d, seed, tokenizer, paths, eval_paths, Path(tmp))
            train, evals = (TokenStore.load(Path(tmp) / name, mmap=False) for name in ("train", "eval"))
        log = meta["log"]
    bounds = np.cumsum([0, *meta["train_file_groups"]]).tolist()
    train_files = [list(range(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    stepwise = bool(train.a["has_steps"].any())
    return Dataset(train, train_files, [w for _, w in specs], evals, log, meta.get("attribute_stats"), stepwise)


def load(
    cfg: Config, out: Path, first: contextlib.AbstractContextManager | None = None, writes: bool = True
) -> tuple[Any, Dataset]:
    """(tokenizer, Dataset) of `cfg`: the synthetic task's files written to `out` by the process that `writes`, inside
    `first` (where several processes share `out`: one that lets it finish before the others go on, dist.main_first),
    then the tokenizer and the tokenised data, every prompt checked to fit train.max_tokens_per_batch."""
    d, t = cfg.data, cfg.train
    with first or contextlib.nullcontext():
        if writes and not d.train_files:
            write_synthetic(d, out, t.seed, attribute_weights(d.attributes, cfg.loss))
    tokenizer = load_tokenizer(cfg.model.path, out)
    add_step_token(tokenizer, d.step_token)
    # one process per machine tokenises into the token cache while the others poll its lock: no collective waits
    data = build(d, t.seed, tokenizer, out)
    for name, groups in (("train", data.train), ("eval", data.eval)):
        check_budget(groups, t.max_tokens_per_batch, t.share_prompt, f"{name} ", "train.")
    return tokenizer, data


def prepare(cfg: Config) -> Dataset:
    """Fill the token cache for `cfg` (the synthetic task's files are written to train.output_dir)."""
    if not cfg.data.cache:
        raise ConfigError("bigrm prepare fills the token cache: data.cache must be true")
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return load(cfg, out)[1]
