"""The repository and the real HH data beside it."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HH_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
