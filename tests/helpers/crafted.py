"""Files crafted to harm: a pickle that runs a command when loaded, and a manifest recomputed to match it (anyone
who can write a checkpoint can recompute its unkeyed hashes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from bigrm.artifacts import checkpoint


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def code_pickle(file: Path, marker: Path, wrapped=lambda payload: payload) -> None:
    """torch.save of `wrapped(payload)` at `file`, where unpickling the payload creates `marker`."""
    torch.save(wrapped(_RunsCode(marker)), file)


def remanifest(path: Path, ranks: int = 1) -> None:
    """complete.json of checkpoint `path` made to list its files as they are now."""
    meta = checkpoint.read_meta(path)
    meta["files"] = {k: v for rank in range(ranks) for k, v in checkpoint.manifest(path, rank).items()}
    (path / checkpoint.COMPLETE).write_text(json.dumps(meta))
