"""Rows → validated examples.

Files are read with `datasets`; each file's format (ranked, scored, stepwise, pairwise, implicit, rated: see
bigrm.data.formats) is detected from its columns.
Any format but stepwise may carry data.attributes ratings (rated rows: one number each; others: a list per attribute
aligned with the completions); a null or absent rating is masked (NaN in Labels.attributes).
A prompt may be text or a list of chat messages; completions are then assistant strings or message lists.
Every problem is reported with file, line (JSON Lines) or row, and field before any compute is spent.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bigrm import progress
from bigrm.config import DataConfig
from bigrm.data import formats
from bigrm.data.examples import Example, RowError, Text
from bigrm.data.labels import Labels
from bigrm.errors import DataError
from bigrm.hashing import file_hash


@dataclass
class LoadReport:
    rows: int = 0
    skipped: Counter | None = None

    def summary(self) -> str:
        skipped = sum(self.skipped.values()) if self.skipped else 0
        text = f"{self.rows} rows read, {skipped} skipped"
        if skipped:
            text += " (" + "; ".join(f"{n} × {why}" for why, n in self.skipped.most_common()) + ")"
        return text


def read_rows(path: str) -> list[Any]:
    """All rows of a file through `datasets`; JSON files whose rows Arrow cannot type are pinpointed by line."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file or directory")
    datasets.disable_progress_bars()
    # reading a local file needs no network; without this, datasets pings the hub's download counter per file
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    if p.is_dir():
        try:
            return datasets.load_from_disk(str(p)).to_list()
        except FileNotFoundError as err:
            raise DataError(f"{path}: a directory that is not a datasets save_to_disk directory ({err})") from err
    if p.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    name = p.name.lower().removesuffix(".gz")
    kind = "parquet" if name.endswith(".parquet") else "json" if name.endswith((".json", ".jsonl")) else None
    if kind is None:
        raise DataError(f"{path}: unknown file type (expected .json, .jsonl, .parquet, optionally .gz, or a dir)")
    # datasets keys its cache by path and modification time: a file replaced with the same mtime (cp -p, rsync,
    # an archive) would be read as its old rows. Naming the config by the content keys the cache by the bytes.
    name = f"bigrm-{file_hash(p)}"
    try:
        return datasets.load_dataset(kind, name=name, data_files=str(p), split="train").to_list()
    except Exception as err:
        if kind == "json":
            raise DataError(_pinpoint_json(p) or f"{path}: cannot be read as JSON: {err}") from err
        raise DataError(f"{path}: cannot be read as Parquet: {err}") from err


def _read_text(p: Path) -> str:
    """The whole file as text; a corrupt .gz or bytes that are not UTF-8 are a DataError naming the file."""
    try:
        if p.name.endswith(".gz"):
            with gzip.open(p, "rt", encoding="utf-8") as fh:
                return fh.read()
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{p}: not UTF-8 text (byte {err.start} of the {'decompressed ' * p.name.endswith('.gz')}"
            f"file: {err.reason})"
        ) from err
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{p}: not a readable gzip file ({err})") from err


def _kind(value: Any) -> str:
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def _json_rows(p: Path):
    """(location, parsed row or a parse-error message) for a JSON array file or a JSON Lines file."""
    text = _read_text(p)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        yield from ((f"{p}:row {i}", row) for i, row in enumerate(whole))
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{p}:line {lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                yield f"{p}:line {lineno}", JsonProblem(f"not valid JSON ({err.msg})")


class JsonProblem(str):
    pass


def _pinpoint_json(p: Path) -> str | None:
    """Arrow reports type clashes without a line number; find the first row that breaks the file's schema."""
    seen: dict[str, tuple[str, str]] = {}
    for where, row in _json_rows(p):
        if isinstance(row, JsonProblem):
            return f"{where}: {row}"
        if not isinstance(row, dict):
            return f"{where}: the row is a {type(row).__name__}, not a JSON object"
        for key, value in row.items():
            if value is None:
                continue
            first = seen.setdefault(key, (_kind(value), where.rsplit(":", 1)[1]))
            if first[0] != _kind(value):
                return (
                    f"{where}: field {key!r}: is a {_kind(value)} but was a {first[0]} on {first[1]}; "
                    "every row must use the same type for a field"
                )
    return None


def _line_numbers(p: Path) -> list[int]:
    """Row index → physical line of a JSON Lines file (blank lines are not rows)."""
    return [n for n, line in enumerate(_read_text(p).splitlines(), 1) if line.strip()]


class Locator:
    def __init__(self, path: str):
        self.path = path
        self._lines: list[int] | None = None
        low = path.lower().removesuffix(".gz")
        self._jsonl = low.endswith(".jsonl") and Path(path).is_file()

    def __call__(self, index: int) -> str:
        if self._jsonl:
            if self._lines is None:
                self._lines = _line_numbers(Path(self.path))
            if index < len(self._lines):
                return f"{self.path}:line {self._lines[index]}"
        return f"{self.path}:row {index}"


def detect_format(columns: set[str], cfg: DataConfig, path: str) -> str:
    """The name of the file's format (bigrm.data.formats.FORMATS), from its first row's columns."""
    return formats.detect(columns, cfg, path).name


def parse_row(row: Any, fmt: str, cfg: DataConfig, where: str) -> Example | RowError:
    """One row of a file of format `fmt` (a name in bigrm.data.formats.FORMATS) as an Example, or what is wrong."""
    return formats.FORMATS[fmt].parse(row, cfg, where)


def prompt_key(prompt: Text) -> str:
    """What makes two rows' prompts the same prompt (text, or chat messages)."""
    return json.dumps(prompt, sort_keys=True)


def group_solutions(examples: list[Example], size: int) -> list[Example]:
    """Stepwise solutions of the same prompt as groups of up to `size`, in order of the prompt's first row."""
    by_prompt: dict[str, list[Example]] = {}
    for e in examples:
        by_prompt.setdefault(prompt_key(e.prompt), []).append(e)
    groups = []
    for same in by_prompt.values():
        for lo in range(0, len(same), size):
            part = same[lo : lo + size]
            labels = Labels(
                (-1,) * len(part),
                steps=tuple(s for e in part for s in e.labels.steps),
                step_weights=tuple(w for e in part for w in e.labels.step_weights),
            )
            source = part[0].source + (f" (+{len(part) - 1} rows with the same prompt)" if len(part) > 1 else "")
            completions = tuple(c for e in part for c in e.completions)
            split = None if part[0].split_steps is None else tuple(s for e in part for s in e.split_steps)
            ends = tuple(s for e in part for s in e.step_ends)
            groups.append(Example(part[0].prompt, completions, source, labels, ends, split))
    return groups


def standardise_scores(examples: list[Example]) -> list[Example]:
    """Regression targets: every scored example's scores, standardised over all scores of the file."""
    values = [v for e in examples if e.labels.scores for v in e.labels.scores]
    if not values:
        return examples
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) or 1.0
    return [
        replace(e, labels=replace(e.labels, targets=tuple((v - mean) / std for v in e.labels.scores)))
        if e.labels.scores
        else e
        for e in examples
    ]


@dataclass
class RowFile:
    """A file's rows, read but not yet validated, with their format and how to name each row in an error."""

    rows: list[Any]
    fmt: str
    locate: Locator


def read_file(path: str, cfg: DataConfig) -> RowFile:
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    fmt = detect_format(set(rows[0]) if isinstance(rows[0], dict) else set(), cfg, path)
    return RowFile(rows, fmt, Locator(path))


def load_file(path: str, cfg: DataConfig) -> tuple[list[Example], list[RowError], int]:
    file = read_file(path, cfg)
    examples, errors = [], []
    for i, row in enumerate(progress.each(file.rows, f"validate {Path(path).name}", unit="row")):
        parsed = parse_row(row, file.fmt, cfg, file.locate(i))
        (errors if isinstance(parsed, RowError) else examples).append(parsed)
    if file.fmt == "stepwise":
        examples = group_solutions(examples, cfg.step_group_size)
    return standardise_scores(examples), errors, len(file.rows)


def listed(errors: list, max_errors: int) -> str:
    """Row errors as the indented lines of an error message: the first max_errors (data.max_errors), then a count."""
    shown = "".join(f"\n  {e}" for e in errors[:max_errors])
    return shown + (f"\n  ... and {len(errors) - max_errors} more" if len(errors) > max_errors else "")


def load_examples(paths: list[str], cfg: DataConfig) -> tuple[list[list[Example]], LoadReport]:
    """Examples per file, after validating every file; stops listing all errors unless skip_invalid."""
    per_file, errors, report = [], [], LoadReport(skipped=Counter())
    for path in paths:
        examples, errs, n = load_file(path, cfg)
        per_file.append(examples)
        errors += errs
        report.rows += n
    if errors and not cfg.skip_invalid:
        raise DataError(
            f"{len(errors)} invalid row(s) (set data.skip_invalid: true to skip them):{listed(errors, cfg.max_errors)}"
        )
    report.skipped.update(f"{e.field}: {e.reason}" for e in errors)
    return per_file, report


def file_specs(entries: list) -> list[tuple[str, float]]:
    """data.train_files entries as (path, weight)."""
    specs = []
    for entry in entries:
        if isinstance(entry, str):
            specs.append((entry, 1.0))
        elif isinstance(entry, dict) and isinstance(entry.get("path"), str) and set(entry) <= {"path", "weight"}:
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise DataError(f"data.train_files: weight of {entry['path']} must be a positive number")
            specs.append((entry["path"], float(weight)))
        else:
            raise DataError(f"data.train_files: {entry!r} is neither a path nor a {{path, weight}} mapping")
    return specs


def mix(per_file: list[list[Any]], weights: list[float], seed: int) -> list[Any]:
    """round(w * n) items of each file: floor(w) whole copies plus a seeded sample for the rest."""
    rng = random.Random(seed)
    out: list[Any] = []
    for items, w in zip(per_file, weights, strict=True):
        whole = int(w)
        out += items * whole
        out += rng.sample(items, round(w * len(items)) - whole * len(items))
    return out
