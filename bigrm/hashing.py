"""Content hashes of files: what checkpoint, export and token-cache manifests record, and what keys the cache of rows
read."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import xxhash


def file_hash(path: Path) -> str:
    """xxh3_64 of the file's bytes (several GB/s: cheap next to reading or loading them)."""
    h = xxhash.xxh3_64()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def listing(root: Path, files: Iterable[Path]) -> dict[str, dict]:
    """{path relative to root: {size, xxh3_64}} of `files`: a manifest."""
    return {str(p.relative_to(root)): {"size": p.stat().st_size, "xxh3_64": file_hash(p)} for p in files}


def differs(root: Path, files: dict[str, dict], content: bool = True) -> str | None:
    """Why the files under root are not those of the manifest `files` (the first that differs), or None; sizes only
    unless `content`."""
    for name, saved in files.items():
        f = root / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != saved["size"]:
            return f"{f} has {f.stat().st_size} bytes, {saved['size']} when saved (truncated or replaced)"
        if content and file_hash(f) != saved["xxh3_64"]:
            return f"{f} is not the file saved (its content hash differs)"
    return None
