"""Rows → validated examples.

JSON files are read as parsed JSON (a string is never converted to a number or boolean), Parquet and save_to_disk
directories with `datasets`; each row's format (ranked, scored, stepwise, pairwise, implicit, rated: see
bigrm.data.formats) is detected from its own columns, and a row not of the file's (most rows') format is its error.
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
import tempfile
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
    """All rows of a file: JSON and JSON Lines as parsed JSON (a string stays a string, each row keeps its own
    fields), Parquet and `datasets.save_to_disk` directories through `datasets`."""
    return _read(Path(path))[0]


def _read(p: Path) -> tuple[list[Any], list[int] | None]:
    """(rows, each row's line for JSON Lines or None)."""
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        return _datasets_rows(p, None), None
    if p.stat().st_size == 0:
        raise DataError(f"{p}: empty file")
    name = p.name.lower().removesuffix(".gz")
    if name.endswith((".json", ".jsonl")):
        return _json_rows(p)
    if name.endswith(".parquet"):
        return _datasets_rows(p, "parquet"), None
    raise DataError(f"{p}: unknown file type (expected .json, .jsonl, .parquet, optionally .gz, or a dir)")


def _datasets_rows(p: Path, kind: str | None) -> list[Any]:
    """Rows read by `datasets`, its Arrow copy of the file kept in a temporary directory: nothing is left in
    ~/.cache/huggingface, and no stale copy can stand for a file replaced with the same mtime (cp -p, rsync)."""
    import datasets

    datasets.disable_progress_bars()
    # reading a local file needs no network; without this, datasets pings the hub's download counter per file
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    if kind is None:
        try:
            return datasets.load_from_disk(str(p)).to_list()
        except FileNotFoundError as err:
            raise DataError(f"{p}: a directory that is not a datasets save_to_disk directory ({err})") from err
    with tempfile.TemporaryDirectory(prefix="bigrm-datasets-") as cache:
        try:
            return datasets.load_dataset(kind, data_files=str(p), split="train", cache_dir=cache).to_list()
        except Exception as err:
            raise DataError(f"{p}: cannot be read as Parquet: {err}") from err


def _read_text(p: Path) -> str:
    """The whole file as text; a corrupt .gz or bytes that are not UTF-8 are a DataError naming the file."""
    try:
        if p.name.endswith(".gz"):
            with gzip.open(p, "rt", encoding="utf-8-sig") as fh:
                return fh.read()
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{p}: not UTF-8 text (byte {err.start} of the {'decompressed ' * p.name.endswith('.gz')}"
            f"file: {err.reason})"
        ) from err
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{p}: not a readable gzip file ({err})") from err


def _json_rows(p: Path) -> tuple[list[Any], list[int] | None]:
    """A JSON array file's rows, or a JSON Lines file's rows with their lines; every row must be an object."""
    text = _read_text(p)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        if whole and not any(isinstance(row, dict) for row in whole):
            raise DataError(f"{p}: a JSON array of {type(whole[0]).__name__} values, not of row objects")
        rows, lines = whole, None
    else:
        rows, lines = [], []
        # only "\n" ends a JSON Lines row: str.splitlines would also split inside strings holding U+2028 or \x85
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise not_json(p, lineno, err) from err
                lines.append(lineno)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise not_object(p, f"line {lines[i]}" if lines is not None else f"row {i}", row)
    return rows, lines


def not_json(p: Path, lineno: int, err: json.JSONDecodeError) -> DataError:
    return DataError(f"{p}:line {lineno}: not valid JSON ({err.msg})")


def not_object(p: Path, where: str, row: Any) -> DataError:
    return DataError(f"{p}:{where}: the row is a {type(row).__name__}, not a JSON object")


class Locator:
    """Names row i in an error: its line in a JSON Lines file, else its index."""

    def __init__(self, path: str, lines: list[int] | None = None):
        self.path = path
        self.lines = lines

    def __call__(self, index: int) -> str:
        if self.lines is not None:
            return f"{self.path}:line {self.lines[index]}"
        return f"{self.path}:row {index}"


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
    return standardised(examples, *score_moments(values)) if values else examples


def score_moments(values) -> tuple[float, float]:
    """(mean, std) of the scores, a non-empty sequence read twice (the streaming build's is on disk)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) or 1.0


def standardised(examples: list[Example], mean: float, std: float) -> list[Example]:
    """The scored examples with targets (score - mean) / std."""
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
    misfits: dict[frozenset, str]  # a row's columns → why a row with them is not of the file's format

    def parse(self, i: int, cfg: DataConfig, row: Any = None) -> Example | RowError:
        """Row i (or `row`, a rewriting of it) as an Example, or what is wrong with it."""
        row = self.rows[i] if row is None else row
        parsed = parse_row(row, self.fmt, cfg, self.locate(i))
        misfit = self.misfits.get(columns_of(row))
        if misfit is None:
            return parsed
        if isinstance(parsed, RowError):
            return replace(parsed, reason=f"{parsed.reason} ({misfit})")
        return RowError(parsed.source, "<row>", misfit)


def columns_of(row: Any) -> frozenset:
    """The columns a row has: null is absent, as in a Parquet file or directory, where every row has every column."""
    return frozenset(k for k, v in row.items() if v is not None) if isinstance(row, dict) else frozenset()


def file_format(rows: list[Any], cfg: DataConfig, path: str) -> tuple[str, dict[frozenset, str]]:
    """The format of most of the file's rows, each detected from its own columns, and why the rows whose
    columns are of another format are not: one odd row is that row's error, not a retyping of the file."""
    return format_of(Counter(map(columns_of, rows)), cfg, path)


def format_of(counts: Counter, cfg: DataConfig, path: str) -> tuple[str, dict[frozenset, str]]:
    """file_format from how many rows have each set of columns, in the order the sets first appear."""
    found: dict[frozenset, str | DataError] = {}
    votes: Counter = Counter()
    for columns, n in counts.items():
        try:
            found[columns] = formats.detect(set(columns), cfg, path).name
        except DataError as err:
            found[columns] = err
        votes[str(found[columns])] += n
    winner = votes.most_common(1)[0][0]
    fmt = next(v for v in found.values() if str(v) == winner)
    if isinstance(fmt, DataError):
        raise fmt
    # a row whose columns fit no format is parsed as the file's format, which names the field it lacks
    misfits = {
        columns: f"its columns {sorted(columns)} make it {'an' if other[0] in 'aeiou' else 'a'} {other} row, "
        f"but the file's rows are {fmt} (most rows')"
        for columns, other in found.items()
        if isinstance(other, str) and other != fmt
    }
    return fmt, misfits


def read_file(path: str, cfg: DataConfig) -> RowFile:
    rows, lines = _read(Path(path))
    if not rows:
        raise DataError(f"{path}: no rows")
    fmt, misfits = file_format(rows, cfg, path)
    return RowFile(rows, fmt, Locator(path, lines), misfits)


def load_file(path: str, cfg: DataConfig) -> tuple[list[Example], list[RowError], int]:
    file = read_file(path, cfg)
    examples, errors = [], []
    for i in progress.each(range(len(file.rows)), f"validate {Path(path).name}", unit="row"):
        parsed = file.parse(i, cfg)
        (errors if isinstance(parsed, RowError) else examples).append(parsed)
    if file.fmt == "stepwise":
        examples = group_solutions(examples, cfg.step_group_size)
    return standardise_scores(examples), errors, len(file.rows)


def listed(errors: list, max_errors: int, total: int | None = None) -> str:
    """Row errors as the indented lines of an error message: the first max_errors (data.max_errors), then a count
    (of `total` errors, where `errors` are only the first ones)."""
    total = len(errors) if total is None else total
    shown = "".join(f"\n  {e}" for e in errors[:max_errors])
    return shown + (f"\n  ... and {total - max_errors} more" if total > max_errors else "")


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
