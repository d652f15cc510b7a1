"""Config → tokenised train/eval groups: files (or the synthetic task), validation, hold-out, tokenisation.

Runs entirely before the model is built, so bad data fails before any compute is spent.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from bigrm import synthetic
from bigrm.config import Config
from bigrm.data import DataError, file_specs, load_examples
from bigrm.packing import check_budget
from bigrm.sequences import Group, tokenize_examples


@dataclass
class Dataset:
    train: list[Group]
    train_files: list[list[int]]  # group indices of each training file, for per-epoch mixing
    weights: list[float]
    eval: list[Group]
    log: list[str] = field(default_factory=list)


def synthetic_paths(out_dir: Path, cfg: Config) -> tuple[Path, Path | None]:
    return out_dir / "synthetic-train.jsonl", out_dir / "synthetic-eval.jsonl" if cfg.data.synthetic.num_eval else None


def write_synthetic(cfg: Config, out_dir: Path) -> None:
    """The built-in task as JSON Lines files, so it takes the same path as user data."""
    s = cfg.data.synthetic
    for path, n, seed in zip(synthetic_paths(out_dir, cfg), (s.num_train, s.num_eval), (0, 1), strict=True):
        if path is not None:
            rows = synthetic.make_rows(n, s.min_k, s.max_k, cfg.train.seed + seed)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build(cfg: Config, tokenizer, synthetic_dir: Path) -> Dataset:
    """Reads data.train_files / eval_files, or the synthetic files that write_synthetic put in synthetic_dir."""
    d = cfg.data
    if d.train_files:
        specs = file_specs(d.train_files)
        eval_paths = [str(p) for p in d.eval_files]
    else:
        train_path, eval_path = synthetic_paths(synthetic_dir, cfg)
        specs, eval_paths = [(str(train_path), 1.0)], [str(eval_path)] if eval_path else []
    log = []
    per_file, report = load_examples([p for p, _ in specs], d)
    log.append(f"train data: {report.summary()}")
    if eval_paths:
        eval_files, eval_report = load_examples(eval_paths, d)
        eval_examples = [e for f in eval_files for e in f]
        log.append(f"eval data: {eval_report.summary()}")
    elif d.eval_fraction > 0:
        rng = random.Random(cfg.train.seed)
        eval_examples = []
        for i, examples in enumerate(per_file):
            order = list(range(len(examples)))
            rng.shuffle(order)
            n_eval = round(d.eval_fraction * len(examples))
            held = set(order[:n_eval])
            eval_examples += [examples[j] for j in sorted(held)]
            per_file[i] = [e for j, e in enumerate(examples) if j not in held]
        log.append(f"eval data: {len(eval_examples)} prompts held out (data.eval_fraction={d.eval_fraction})")
    else:
        eval_examples = []
        log.append("eval data: none (set data.eval_files or data.eval_fraction)")

    train, train_files = [], []
    for examples in per_file:
        groups, enc = tokenize_examples(
            examples, tokenizer, d.max_length, d.overlong, d.reward_convention, d.max_errors
        )
        train_files.append(list(range(len(train), len(train) + len(groups))))
        train += groups
        log.append(f"train tokens: {enc.summary()}")
    if not train:
        raise DataError("no training prompts left after validation")
    evals, enc = tokenize_examples(
        eval_examples, tokenizer, d.max_length, d.overlong, d.reward_convention, d.max_errors
    )
    if eval_examples:
        log.append(f"eval tokens: {enc.summary()}")
    for name, groups in (("train", train), ("eval", evals)):
        check_budget(groups, cfg.train.max_tokens_per_batch, cfg.train.share_prompt, f"{name} ", "train.")
    return Dataset(train, train_files, [w for _, w in specs], evals, log)
