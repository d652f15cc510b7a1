"""A file's rows a chunk at a time, as rows.RowFile parts: JSON Lines (optionally .gz) line by line, so a file of any
size is never held; JSON arrays, Parquet and save_to_disk directories read whole (rows.read_file) as one part.

The format and the errors are those of reading the file whole, found in the same order: bytes that are not UTF-8 or
a corrupt .gz anywhere in the file first, then the first line that is not JSON, then the first row that is not an
object, then a file with no rows; then the format of most rows (rows.format_of).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bigrm.config import DataConfig
from bigrm.data import rows
from bigrm.errors import DataError


def _lines(p: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; a file that cannot be decoded raises reading it whole's error."""
    try:
        with gzip.open(p, "rb") if p.name.endswith(".gz") else p.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):  # split at b"\n" alone, as rows._json_rows splits
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if line.strip():
                    yield lineno, line
    except (UnicodeDecodeError, OSError, EOFError, zlib.error):
        rows._read_text(p)  # raises the whole file's error, which names the byte
        raise


def streamable(p: Path) -> bool:
    """A JSON Lines file: JSON suffix, not a JSON array (its first non-blank character is not `[`)."""
    name = p.name.lower().removesuffix(".gz")
    if not (p.is_file() and p.stat().st_size and name.endswith((".json", ".jsonl"))):
        return False
    try:
        return any(not line.lstrip().startswith("[") for _, line in _first(p))
    except DataError:
        return False  # read whole, which raises the same error


def _first(p: Path) -> Iterator[tuple[int, str]]:
    for item in _lines(p):
        yield item
        return


def column_counts(p: Path, path: str) -> Counter:
    """How many rows of a JSON Lines file have each set of columns (rows.format_of's vote), every line checked to be
    a JSON object."""
    counts: Counter = Counter()
    bad_json = bad_row = None
    for lineno, line in _lines(p):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            bad_json = bad_json or rows.not_json(p, lineno, err)
            continue
        if not isinstance(row, dict):
            bad_row = bad_row or rows.not_object(p, f"line {lineno}", row)
        counts[rows.columns_of(row)] += 1
    if bad_json or bad_row:
        raise bad_json or bad_row
    if not counts:
        raise DataError(f"{path}: no rows")
    return counts


class ChunkedFile:
    """A file of rows, its format known (read once through), handed out as RowFiles of up to `size` rows each."""

    def __init__(self, path: str, cfg: DataConfig):
        self.path, self.cfg = path, cfg
        self.whole = not streamable(Path(path))
        if self.whole:
            file = rows.read_file(path, cfg)
            self.fmt, self.misfits = file.fmt, file.misfits
        else:
            self.fmt, self.misfits = rows.format_of(column_counts(Path(path), path), cfg, path)

    def parts(self, size: int) -> Iterator[rows.RowFile]:
        if self.whole:
            yield rows.read_file(self.path, self.cfg)
            return
        chunk, lines = [], []
        for lineno, line in _lines(Path(self.path)):
            chunk.append(json.loads(line))
            lines.append(lineno)
            if len(chunk) == size:
                yield rows.RowFile(chunk, self.fmt, rows.Locator(self.path, lines), self.misfits)
                chunk, lines = [], []
        if chunk:
            yield rows.RowFile(chunk, self.fmt, rows.Locator(self.path, lines), self.misfits)
