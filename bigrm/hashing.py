"""Content hashes of files: what a checkpoint's manifest records and what keys the cache of rows read."""

from __future__ import annotations

from pathlib import Path

import xxhash


def file_hash(path: Path) -> str:
    """xxh3_64 of the file's bytes (several GB/s: cheap next to reading or loading them)."""
    h = xxhash.xxh3_64()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
