"""Config → tokenizer and tokenised dataset: the data phase that training and `bigrm prepare` share.

`bigrm prepare --config …` runs it ahead of training (e.g. on a CPU node before the GPU job): it fills the token
cache (data.cache) that a training run with the same options then memory-maps, and prints the same report.
"""

from __future__ import annotations

from pathlib import Path

from bigrm import pipeline, tiny
from bigrm.config import Config, ConfigError
from bigrm.model import prepare_tokenizer


def load_tokenizer(cfg: Config, out: Path):
    """model.path's tokenizer, or the built-in tiny model's (written into `out` by the first process to need it)."""
    from transformers import AutoTokenizer

    path = cfg.model.path
    if not path:
        path = out / "tiny-llama"
        if not (path / "tokenizer_config.json").exists():
            tiny.write_tiny(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    return tokenizer


def prepare(cfg: Config) -> pipeline.Dataset:
    """Fill the token cache for `cfg` (the synthetic task's files are written to train.output_dir)."""
    if not cfg.data.cache:
        raise ConfigError("bigrm prepare fills the token cache: data.cache must be true")
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg, out)
    if not cfg.data.train_files:
        pipeline.write_synthetic(cfg, out)
    return pipeline.build(cfg, tokenizer, out)
