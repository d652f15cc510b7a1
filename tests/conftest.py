"""Shared fixtures: tiny random-initialised models built offline, and the real HH data beside the repo."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
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


@pytest.fixture(autouse=True)
def no_process_group_left(request) -> Iterator[None]:
    """A process group an in-process run leaves joined (it should leave it: bigrm.dist.shutdown) is torn down after
    its test, with a warning naming the test, so later tests see the world they set up themselves."""
    yield
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
        warnings.warn(f"{request.node.nodeid} left a torch.distributed process group joined", stacklevel=1)
