"""The model shapes the benchmarks train, defined once: bench_gpu.py and bench_speed.py build the same models."""

from __future__ import annotations

import json
from pathlib import Path

from bench_memory import BIG

from bigrm.builtin.tiny import write_tiny

# config.json overrides of bigrm/assets/tiny-llama.json; "tiny" is that file as shipped
SHAPES = {
    "tiny": {},
    # TinyLlama-1.1B's architecture (1.03B parameters as a classifier: no LM head)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "7b": {**BIG["Llama-2-7B"], "max_position_embeddings": 4096},
}  # fmt: skip


def write_config(size: str, dest: Path) -> Path:
    """A model directory with config.json and the built-in tokenizer, no weights: load it with random init. The
    tokenizer's ids are < 512, so any vocabulary above holds them; the benchmarks measure shapes, not text quality."""
    dest = write_tiny(dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(SHAPES[size])
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest
