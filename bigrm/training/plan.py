"""Training options + dataset → every optimizer update (an optimizer step) of the run, the same on every rank, and the
fingerprints a resume must find unchanged: of what fixes the updates, and of what shapes the optimisation."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from bigrm import dist
from bigrm.config import Config, LossConfig, TrainConfig
from bigrm.data.packing import Update, layout_tokens, plan_epoch
from bigrm.data.pipeline import Dataset
from bigrm.data.rows import mix
from bigrm.data.sequences import Group
from bigrm.errors import CheckpointError, ConfigError
from bigrm.training import ds_config


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
            world=dist.data_parallel_world(),  # a sequence-parallel group trains on one micro-batch
            accum=t.micro_batches_per_step,
            window=t.packing_window,
            seed=t.seed,
            epoch=epoch,
        )
    return updates[: t.max_steps] if t.max_steps else updates


def warnings(t: TrainConfig, loss: LossConfig, data: Dataset, updates: list[Update]) -> list[str]:
    """What makes a run train less than asked or nothing at all, said before it starts."""
    found = []
    if t.max_steps and t.max_steps > len(updates):
        found.append(
            f"warning: train.max_steps={t.max_steps} but train.epochs={t.epochs} of this data give {len(updates)} "
            f"optimizer steps: the run stops after {len(updates)} (raise train.epochs for more)"
        )
    if not any(_informative(g, loss) for g in data.train):
        found.append(
            "warning: no training prompt has two completions of different rank (every pair is tied), step labels or "
            "ratings: the loss has nothing to learn from and the model will not change"
        )
    return found


def _informative(group: Group, loss: LossConfig) -> bool:
    labels = group.labels
    ranks = labels.ranks or range(len(group.seqs))  # no ranks: the completions' order is their ranking
    regressed = labels.targets is not None and loss.scores != "rank"
    tied = loss.tie_coef > 0 and len(set(ranks)) < len(ranks)  # loss.tie_coef pulls tied rewards together
    return len(set(ranks)) > 1 or bool(labels.steps) or bool(labels.attributes) or regressed or tied


def resumed_line(path: Path, done: int, updates: list[Update]) -> str:
    """What a resume continues: steps numbered from 1 over the run, as the logs number them."""
    update = updates[done - 1]
    epoch = f"{update.index + 1} of them in epoch {update.epoch + 1}"
    then = f"continuing with step {done + 1}" if done < len(updates) else "none left"
    return f"resumed from {path} at step {done}: {done} of {len(updates)} optimizer steps done, {epoch}; {then}"


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
        # the groups' count fixes what each micro-batch holds; recorded when on, so older checkpoints still compare
        **({"sequence_parallel": t.sequence_parallel} if t.sequence_parallel > 1 else {}),
    }


# what each plan_fingerprint key is, as a user sets or sees it
PLAN_NAMES = {
    "seed": "train.seed",
    "epochs": "train.epochs",
    "steps": "optimizer steps",
    "max_tokens_per_batch": "train.max_tokens_per_batch",
    "micro_batches_per_step": "train.micro_batches_per_step",
    "packing_window": "train.packing_window",
    "share_prompt": "train.share_prompt",
    "train_prompts": "training prompts",
    "train_tokens": "training tokens",
    "file_weights": "data.train_files weights",
}


def check_resumable(saved: dict, fingerprint: dict, path: Path) -> None:
    """A checkpoint's plan must be this run's: anything else would continue on other batches (train.resume_override
    cannot change it: the updates done were those of the checkpoint's plan, and its schedule is saved with it)."""
    if saved != fingerprint:
        changed = [
            f"{PLAN_NAMES.get(k, k)} {saved.get(k)!r} → {v!r}" for k, v in fingerprint.items() if saved.get(k) != v
        ]
        raise CheckpointError(
            f"cannot resume {path}: the data plan changed ({'; '.join(changed)}); a resume continues the checkpoint's "
            "batches in its order, so keep these settings (to train further on other settings, start a new run from "
            "the exported model with model.path)"
        )


# besides these, every option of the loss, lora and quantization sections
SHAPING = {
    "train": ("lr", "weight_decay", "adam_betas", "warmup_ratio", "min_lr_ratio", "grad_clip"),
    "model": ("path", "dtype", "attn_impl", "random_init"),
}


# the sections of train.deepspeed_config's JSON that shape the optimisation, compared as the file has them (its
# "auto" values are the options above)
DEEPSPEED = ("optimizer", "scheduler", "gradient_clipping", "bf16", "fp16", "zero_optimization", "data_types")


def optimisation_fingerprint(cfg: Config) -> dict:
    """What shapes the optimisation besides the data, as `section.option` (`deepspeed.<section>` for the DeepSpeed
    JSON's): a resume that changed any of it would silently continue one run with another's settings."""
    picked = {f"{section}.{k}": getattr(getattr(cfg, section), k) for section, keys in SHAPING.items() for k in keys}
    for section in ("loss", "lora", "quantization"):
        picked |= {f"{section}.{k}": v for k, v in asdict(getattr(cfg, section)).items()}
    ds, _ = ds_config.load(cfg.train)
    picked |= {f"deepspeed.{k}": ds.get(k) for k in DEEPSPEED}
    return json.loads(json.dumps(picked))  # as a checkpoint's JSON holds it (lists, not tuples)


def check_overrides(overrides: list[str], now: dict) -> None:
    """train.resume_override names options a resume compares (`now`: optimisation_fingerprint), fresh run or not."""
    unknown = sorted(set(overrides) - set(now))
    if unknown:
        raise ConfigError(f"train.resume_override: {unknown} are not options a resume checks; they are {sorted(now)}")


def check_optimisation(saved: dict | None, now: dict, overrides: list[str], path: Path) -> list[str]:
    """Refuses a resume whose optimisation settings differ from the checkpoint's, except those named in `overrides`
    (train.resume_override); returns the lines to log: each overridden change, or that the checkpoint predates the
    check. An option the checkpoint does not record (added since) cannot be compared and is not refused."""
    check_overrides(overrides, now)
    if saved is None:
        return [f"resume: {path} records no optimisation settings (written before bigrm checked them): not compared"]
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
    refused = [f"{k} {a!r} → {b!r}" for k, (a, b) in changed.items() if k not in overrides]
    if refused:
        raise CheckpointError(
            f"cannot resume {path}: {'; '.join(refused)} would change what shapes the optimisation mid-run; keep the "
            "checkpoint's values, or name the options in train.resume_override to continue with the new ones"
        )
    return [f"resume: {k} {a!r} → {b!r} from here on (train.resume_override)" for k, (a, b) in changed.items()]
