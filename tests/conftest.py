"""Shared fixtures: tiny random-initialised models built offline, and the real HH data beside the repo."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.models import make_model_dir, write_backbone

# Every run's token cache (data.cache) in a directory of this test session, subprocesses included. Set when pytest
# imports this file, before any test module copies os.environ for its subprocesses: a fixture would come too late,
# and runs would share ~/.cache/bigrm/tokens with every earlier session.
TOKEN_CACHE = Path(tempfile.mkdtemp(prefix="bigrm-tests-token-cache-"))
os.environ["BIGRM_CACHE_DIR"] = str(TOKEN_CACHE)


@pytest.fixture(autouse=True, scope="session")
def token_cache_dir() -> Iterator[Path]:
    yield TOKEN_CACHE
    shutil.rmtree(TOKEN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def neox_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("neox"), "gpt_neox")


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory):
    """family → the directory of a tiny random classifier of that family (written once per session)."""
    root = tmp_path_factory.mktemp("backbones")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = write_backbone(root / family, family)
        return made[family]

    return get
