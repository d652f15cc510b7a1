"""Training options + dataset → every optimizer update (an optimizer step) of the run, the same on every rank, and the
fingerprint of what fixes them, which a resume must find unchanged."""

from __future__ import annotations

from pathlib import Path

from bigrm import dist
from bigrm.config import TrainConfig
from bigrm.data.packing import Update, layout_tokens, plan_epoch
from bigrm.data.pipeline import Dataset
from bigrm.data.rows import mix
from bigrm.errors import CheckpointError


def plan(t: TrainConfig, data: Dataset) -> list[Update]:
    """Every optimizer update of the run (train.max_steps of them at most); identical on every rank."""
    sizes = [layout_tokens(g, t.share_prompt) for g in data.train]
    updates = []
    for epoch in range(t.epochs):
        items = mix(data.train_files, data.weights, t.seed + epoch)
        updates += plan_epoch(
            items,
            sizes,
            budget=t.max_tokens_per_batch,
            world=dist.world(),
            accum=t.micro_batches_per_step,
            window=t.packing_window,
            seed=t.seed,
            epoch=epoch,
        )
    return updates[: t.max_steps] if t.max_steps else updates


def plan_fingerprint(t: TrainConfig, data: Dataset, updates: list[Update]) -> dict:
    """What fixes the data order: a resume with any of it changed would silently train on other batches."""
    return {
        "seed": t.seed,
        "epochs": t.epochs,
        "steps": len(updates),  # the key checkpoints have always held
        "max_tokens_per_batch": t.max_tokens_per_batch,
        "micro_batches_per_step": t.micro_batches_per_step,
        "packing_window": t.packing_window,
        "share_prompt": t.share_prompt,
        "train_prompts": len(data.train),
        "train_tokens": sum(g.num_tokens for g in data.train),
        "file_weights": data.weights,
    }


def check_resumable(saved: dict, fingerprint: dict, path: Path) -> None:
    """A checkpoint's plan must be this run's: anything else would continue on other batches."""
    if saved != fingerprint:
        changed = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
        raise CheckpointError(f"cannot resume {path}: the data plan changed {changed}")
