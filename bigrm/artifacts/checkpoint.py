"""DeepSpeed checkpoints that a resume can trust.

<output_dir>/checkpoints/step-00000042/ holds DeepSpeed's shards (weights, optimizer, scheduler), every rank's RNG
state, the model's config and tokenizer (hf/), a few held-out sequences to verify exports (verify.pt), and last of
all `complete.json`, written by rank 0 only after every rank has finished writing. A directory without it (a
save cut short by a crash or a kill) is never resumed from. `complete.json` lists every file with its size and
content hash, each computed by the rank that wrote the file: a resume or an export first checks them, so a missing,
truncated or replaced file is named instead of loaded. The hash finds damage, not tampering (anyone can recompute
it): what stops a rewritten file from running code is that every pickle in a checkpoint, DeepSpeed's included, is
unpickled as tensors and plain values only (`tensors_only`).

Every checkpoint records the id of the run that wrote it: a run continues its own checkpoints (or, with `--resume`,
another run's), never writes among those of an unrelated run, and prunes only its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from bigrm import dist
from bigrm.errors import CheckpointError, write_failure
from bigrm.hashing import differs, listing

COMPLETE = "complete.json"


def root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def tag(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def read_meta(path: Path) -> dict:
    return json.loads((path / COMPLETE).read_text())


def complete_checkpoints(out_dir: Path, run: str | None = None) -> list[Path]:
    """Complete checkpoints (only run `run`'s when given), oldest first."""
    found = [p for p in root(out_dir).glob("step-*") if p.is_dir() and is_complete(p)]
    found = [p for p in found if run is None or read_meta(p).get("run") == run]
    return sorted(found, key=lambda p: read_meta(p)["step"])


# DeepSpeed's ZeRO shards and bigrm's RNG files name the rank that writes them; rank 0 writes every other file
_OWNER = re.compile(r"(?:zero_pp_rank_|rng-rank)(\d+)[_.]")


def _owner(name: str) -> int:
    found = _OWNER.search(name)
    return int(found[1]) if found else 0


def manifest(path: Path, rank: int) -> dict[str, dict]:
    """{relative path: {size, xxh3_64}} of the checkpoint's files that `rank` wrote."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(COMPLETE))
    return listing(path, [p for p in files if _owner(p.name) == rank])


def damage(path: Path) -> str | None:
    """Why the checkpoint's files are not those it was saved with (the first file that differs), or None."""
    files = read_meta(path).get("files")
    if files is None:
        return f"{path / COMPLETE} lists no files (a checkpoint from before manifests): it cannot be verified"
    return differs(path, files)


def resolve_resume(resume: str, out_dir: Path) -> Path | None:
    """`train.resume`: "" → None; "auto" → the newest complete checkpoint whose files verify (None if there is no
    complete one); else that path, which must verify."""
    if not resume:
        return None
    if resume == "auto":
        done = complete_checkpoints(out_dir)
        for path in reversed(done):
            problem = damage(path)
            if problem is None:
                return path
            print(f"warning: not resuming from {path}: {problem}", file=sys.stderr)
        if done:
            raise CheckpointError(f"no complete checkpoint in {root(out_dir)} verifies (see the warnings above)")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume: {path} is not a directory")
    if not is_complete(path):
        raise CheckpointError(f"train.resume: {path} has no {COMPLETE}: it was never completely written")
    problem = damage(path)
    if problem:
        raise CheckpointError(
            f"train.resume: {problem}; resume from another checkpoint (--resume auto takes the newest that verifies)"
        )
    return path


def start(resume: str, out_dir: Path, overwrite: bool) -> tuple[Path | None, str]:
    """(the checkpoint this run continues, if any; the run's id), decided before any work (rank 0: it may delete).

    A run that does not continue the checkpoints found in its output_dir refuses to write among them, or, with
    `overwrite`, deletes them first: either way no `ls checkpoints/step-* | tail -1` finds another run's model."""
    path = resolve_resume(resume, out_dir)
    run = (read_meta(path).get("run") if path else None) or uuid.uuid4().hex
    others = [p for p in complete_checkpoints(out_dir) if read_meta(p).get("run") != run]
    if others and resume != "auto":
        if not overwrite:
            raise CheckpointError(
                f"{root(out_dir)} holds checkpoints of another run ({', '.join(p.name for p in others)}): continue "
                "it with --resume auto, write to a new train.output_dir, or delete them with "
                "--train.overwrite_output_dir true"
            )
        for old in others:
            (old / COMPLETE).unlink()  # first: a kill midway through the removal must not leave it trusted
            shutil.rmtree(old)
    return path, run


def _safe_classes() -> list:
    """The classes that bigrm's and DeepSpeed's pickles hold beyond tensors and plain values, each rebuilt from its
    fields without calling its code: numpy's RNG state array, DeepSpeed's ZeRO stage, loss scalers, slice mappings."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    array = np.zeros(0, dtype=np.uint32)
    numpy = [array.__reduce__()[0], np.ndarray, np.dtype, type(array.dtype)]  # _reconstruct: numpy._core in numpy 2
    return [*numpy, ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


_FORCE, _NO_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def tensors_only(path: Path) -> Iterator[None]:
    """Every torch.load inside, DeepSpeed's too (which ask for weights_only=False), unpickles tensors, plain values
    and _safe_classes only: torch's own switch, read at each load. A file of checkpoint `path` that would call
    anything else is refused before it is called (CheckpointError)."""
    saved = {name: os.environ.pop(name, None) for name in (_FORCE, _NO_FORCE)}
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(_safe_classes()):
            yield
    except pickle.UnpicklingError as err:
        called = re.search(r"GLOBAL (\S+)", str(err))
        what = f"would call {called[1]}" if called else "holds more than tensors and plain values"
        raise CheckpointError(f"{path}: refused to load: a file in it {what} (a checkpoint may run no code)") from None
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def read_pt(file: Path) -> object:
    """One of bigrm's own .pt files of a checkpoint, as tensors and plain values only."""
    with tensors_only(file.parent):
        return torch.load(file, weights_only=True, map_location="cpu")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine, out_dir: Path, meta: dict, keep: int, hf_files, verify: list[list[list[int]]], trainable_only: bool = False
) -> Path:
    """Collective. `meta` must hold "step" and "run"; `hf_files(dir)` writes config and tokenizer (rank 0); `verify`
    holds a few groups' token ids for `bigrm export` to check itself with. `trainable_only` (LoRA) leaves the frozen
    base out: it is rebuilt from the base model directory, and a 7B base would otherwise be rewritten at every save."""
    path = root(out_dir) / tag(meta["step"])
    if dist.is_main() and (path / COMPLETE).exists():  # re-saving a step after resuming from an older one
        (path / COMPLETE).unlink()
    dist.barrier()

    def shards() -> None:
        engine.save_checkpoint(
            str(root(out_dir)), tag=path.name, save_latest=False, exclude_frozen_parameters=trainable_only
        )
        torch.save(_rng_state(), path / f"rng-rank{dist.rank()}.pt")
        if dist.is_main():
            hf_files(path / "hf")
            torch.save(verify, path / "verify.pt")

    _agree(_failed(shards), path)  # and every rank's shards are on disk before any rank lists them
    files = {k: v for part in dist.gather_objects(manifest(path, dist.rank())) for k, v in sorted(part.items())}

    def mark() -> None:
        tmp = path / (COMPLETE + ".tmp")
        stage = engine.zero_optimization_stage()
        written = {**meta, "world": dist.world(), "zero_stage": stage, "trainable_only": trainable_only, "files": files}
        tmp.write_text(json.dumps(written, indent=2))
        tmp.replace(path / COMPLETE)  # atomic: the marker exists whole or not at all

    _agree(_failed(mark) if dist.is_main() else None, path)
    if dist.is_main():
        for old in complete_checkpoints(out_dir, meta["run"])[:-keep] if keep else []:
            (old / COMPLETE).unlink()  # first: a kill midway through the removal must not leave it trusted
            shutil.rmtree(old)
    dist.barrier()
    return path


def _failed(write: Callable[[], None]) -> str | None:
    """write(); what went wrong if it could not write (errors.write_failure), else None."""
    try:
        write()
    except Exception as err:
        failure = write_failure(err)
        if failure is None:
            raise
        return failure
    return None


def _agree(failure: str | None, path: Path) -> None:
    """Collective: when any rank could not write its part of checkpoint `path` (a full disk), the torn checkpoint is
    removed and every rank raises the first failure, instead of one rank's traceback and the others waiting."""
    failures = [f for f in dist.gather_objects(failure) if f]
    if failures:
        if dist.is_main():
            shutil.rmtree(path, ignore_errors=True)
        raise CheckpointError(f"cannot write the checkpoint {path}: {failures[0]}")


def load(engine, path: Path) -> dict:
    """Collective. Restores weights, optimizer, scheduler and this rank's RNG; returns the saved meta."""
    meta = read_meta(path)
    if meta["world"] != dist.world():
        raise CheckpointError(
            f"{path} was written by {meta['world']} ranks; resume it with the same number ({dist.world()} now)"
        )
    load_fn = _load_trainable if meta.get("trainable_only") else None
    with tensors_only(path):
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, custom_load_fn=load_fn)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    _set_rng_state(read_pt(path / f"rng-rank{dist.rank()}.pt"))
    return meta


def _load_trainable(src: dict, dst: torch.nn.Module) -> None:
    from bigrm.model.adapters import load_trained

    load_trained(dst, src, "checkpoint")


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights (only the trained ones for a LoRA checkpoint) from any ZeRO stage's shards, on one process
    without DeepSpeed ranks."""
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete bigrm checkpoint (no {COMPLETE})")
    problem = damage(path)
    if problem:
        raise CheckpointError(problem)
    meta = read_meta(path)
    if meta["zero_stage"] == 0:
        return read_pt(path / "mp_rank_00_model_states.pt")["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tensors_only(path):
        return get_fp32_state_dict_from_zero_checkpoint(
            str(path.parent), tag=path.name, exclude_frozen_parameters=meta.get("trainable_only", False)
        )
