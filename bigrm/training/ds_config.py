"""Fill a DeepSpeed JSON from the training options: keys set to "auto" take our values; fixed values must agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bigrm.config import TrainConfig
from bigrm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]  # bigrm/training/ds_config.py → the repository


def resolve_path(path: str) -> Path:
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    return REPO / p


def _set(tree: dict, dotted: str, value: Any, source: Path) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    current = tree.get(leaf, "auto")
    if current == "auto":
        tree[leaf] = value
    elif current != value:
        raise ConfigError(f'{source}: {dotted} is {current!r} but the run config implies {value!r}; set it to "auto"')


def load(t: TrainConfig) -> tuple[dict, Path]:
    """train.deepspeed_config's JSON object, as the file has it."""
    source = resolve_path(t.deepspeed_config)
    try:
        ds = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read DeepSpeed config {source}: {err}") from err
    if not isinstance(ds, dict):
        raise ConfigError(f"{source}: a DeepSpeed config is a JSON object")
    return ds, source


def read(t: TrainConfig, cpu: bool) -> tuple[dict, Path]:
    """train.deepspeed_config's JSON, checked for what bigrm cannot honour (called before any data or model work)."""
    ds, source = load(t)
    if ds.get("train_batch_size", "auto") != "auto":
        raise ConfigError(
            f"{source}: train_batch_size: bigrm derives it (ranks × train.micro_batches_per_step packed micro-batches "
            'of train.max_tokens_per_batch tokens); remove it or set it to "auto"'
        )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage: {stage!r} is not one of 0, 1, 2, 3")
    if cpu and ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{source}: fp16.enabled: fp16 training needs a GPU; on CPU remove the fp16 section")
    return ds, source


def build(t: TrainConfig, total_steps: int, bf16: bool, cpu: bool, hidden_size: int) -> dict:
    ds, source = read(t, cpu)
    warmup = max(1, round(t.warmup_ratio * total_steps))
    filled = {
        "train_micro_batch_size_per_gpu": 1,  # one packed row; its size is set by max_tokens_per_batch
        "gradient_accumulation_steps": t.micro_batches_per_step,
        "gradient_clipping": t.grad_clip,
        "bf16.enabled": bf16,
        "optimizer.type": "AdamW",
        "optimizer.params.lr": t.lr,
        "optimizer.params.betas": list(t.adam_betas),
        "optimizer.params.eps": 1e-8,
        "optimizer.params.weight_decay": t.weight_decay,
        # ZeRO-3 bucket sizes, scaled by the model width as the Hugging Face integration does
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
        "scheduler.type": "WarmupCosineLR",
        "scheduler.params.total_num_steps": max(total_steps, warmup + 1),
        "scheduler.params.warmup_num_steps": warmup,
        "scheduler.params.warmup_min_ratio": 0.0,
        "scheduler.params.cos_min_ratio": t.min_lr_ratio,
        "scheduler.params.warmup_type": "linear",
    }
    for key, value in filled.items():
        _set(ds, key, value, source)
    # torch's AdamW (fused CUDA kernels on GPUs) unless the JSON asks for DeepSpeed's own FusedAdam, a JIT build
    # that needs the CUDA toolkit (nvcc) on every node and does not exist on CPU
    params = ds["optimizer"]["params"]
    if params.get("torch_adam", "auto") == "auto":
        params["torch_adam"] = True
    if params["torch_adam"] and params.get("fused", "auto") == "auto":
        params["fused"] = not cpu
    ds.pop("train_batch_size", None)  # "auto": derived by DeepSpeed from the two above and the world size
    return ds
