"""Memory of full fine-tuning, LoRA and QLoRA: measured here on a small model, computed for 7B and 70B.

    python bench/bench_memory.py                   (both tables; the measured part takes a few minutes on 2 cores)
    python bench/bench_memory.py --computed-only   (the 7B / 70B table alone, instantly)

Measured: the real trainer (`bigrm.training.trainer.run`, ZeRO-3, one CPU rank, fp32, gradient checkpointing) runs
a few optimizer steps of the built-in synthetic task on a ~100M-parameter Llama built here; each setup runs alone in
a child process, whose peak resident memory (VmHWM) is reported together with its resident memory before the model
is loaded (imports), so the difference is what the setup itself costs.

Computed: ZeRO-3 over G GPUs partitions every per-parameter byte below, so each GPU holds 1/G of the total:
  full     bf16 weights 2 + bf16 grads 2 + fp32 master weights 4 + AdamW moments 4 + 4  = 16 bytes per parameter
  LoRA     frozen bf16 weights 2 per parameter; trained weights (adapters, value head) 16 each
  QLoRA    like LoRA, but the backbone's linear weights in NF4: 4 bits + per-block scales (with double
           quantisation 8 bits per 64 weights + 32 bits per 256 blocks: 4.127 bits; without, 32 bits per 64: 4.5)
plus activations: with gradient checkpointing each layer keeps its bf16 input, 2 * hidden * layers bytes per token
of a micro-batch (max_tokens_per_batch), and one layer at a time recomputes its working set (not counted; a
reward model has no vocabulary-sized logits). ZeRO-3 also gathers about one layer's weights at a time (prefetch
buckets): small next to these at 7B and above.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 1024**3
SETUPS = {
    "full": [],
    "lora": ["--lora.r", "16"],
    "qlora": ["--lora.r", "16", "--quantization.bits", "4"],
}
SMALL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16}
# published architectures (Llama 2): sizes only, built on the meta device
BIG = {
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "Llama-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}  # fmt: skip


def status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])


def child(setup: str, model: str, out: str) -> None:
    """One training run in this process; prints its figures as JSON on the last line."""
    import torch

    from bigrm import options
    from bigrm.training.trainer import run

    torch.set_num_threads(2)
    before = status_kib("VmRSS")
    args = ["--model.path", model, "--output_dir", out, "--overwrite_output_dir", "true",
            "--max_steps", "4", "--max_tokens_per_batch", "1024",
            "--data.synthetic.num_train", "200", "--data.synthetic.num_eval", "0", "--export", "false",
            "--report_to", "none", "--log_every", "1", "--dtype", "fp32", "--gradient_checkpointing", "true",
            *SETUPS[setup]]  # fmt: skip
    run(options.from_argv(args))
    print(json.dumps({"before_kib": before, "peak_kib": status_kib("VmHWM")}))


def setup_row(log: Path) -> dict:
    """What the trainer wrote about its run (attention, dtype, parameter counts) as the setup row of its log.jsonl."""
    return next(r for r in map(json.loads, log.read_text().splitlines()) if r["split"] == "setup")


def measure(setup: str, model: Path, work: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", setup, "--model", str(model), "--out", str(work / setup)],
        capture_output=True,
        text=True,
        # glibc otherwise raises its mmap threshold after the first large frees and keeps later ones in its heap:
        # resident memory would then grow step after step with what was freed, not with what the setup holds
        env={**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    if proc.returncode:
        raise RuntimeError(f"{setup} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    ran = setup_row(work / setup / "log.jsonl")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "setup": setup,
        "parameters": ran["parameters"],
        "trainable": ran["trainable"],
        "rss_before_gib": figures["before_kib"] * 1024 / GIB,
        "peak_rss_gib": figures["peak_kib"] * 1024 / GIB,
        "setup_gib": (figures["peak_kib"] - figures["before_kib"]) * 1024 / GIB,
    }


def small_model(dest: Path) -> Path:
    from bigrm.builtin.tiny import write_tiny
    from bigrm.model.reward_model import write_random_init

    src = write_tiny(dest / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(SMALL, num_key_value_heads=SMALL["num_attention_heads"])
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    write_random_init(str(src), str(dest / "init"), seed=0)
    return dest / "init"


def shapes(arch: dict, r: int) -> dict:
    """Parameter counts of a Llama reward model (backbone + value head) without allocating it."""
    import torch
    from torch import nn
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(LlamaConfig(num_labels=1, **arch))
    linear = [m for m in model.model.modules() if isinstance(m, nn.Linear)]
    total = sum(p.numel() for p in model.parameters())
    quantised = sum(m.weight.numel() for m in linear)
    lora = sum(r * (m.in_features + m.out_features) for m in linear)
    head = sum(p.numel() for p in model.score.parameters())
    return {"total": total, "quantised": quantised, "lora": lora, "head": head, "arch": arch}


def computed(name: str, arch: dict, gpus: int, tokens: int, r: int, double_quant: bool = True) -> list[dict]:
    s = shapes(arch, r)
    trained = s["lora"] + s["head"]
    nf4 = (4 + (8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64)) / 8  # bytes per quantised weight
    states = {
        "full": 16 * s["total"],
        "lora": 2 * s["total"] + 16 * trained,
        "qlora": nf4 * s["quantised"] + 2 * (s["total"] - s["quantised"]) + 16 * trained,
    }
    activations = 2 * arch["hidden_size"] * arch["num_hidden_layers"] * tokens
    rows = []
    for setup, total_bytes in states.items():
        rows.append({
            "model": name, "setup": setup, "parameters": s["total"] + (s["lora"] if setup != "full" else 0),
            "trainable": s["total"] if setup == "full" else trained,
            "bytes_per_param": total_bytes / s["total"], "states_gib_total": total_bytes / GIB,
            "states_gib_per_gpu": total_bytes / gpus / GIB, "activations_gib_per_gpu": activations / GIB,
            "gib_per_gpu": (total_bytes / gpus + activations) / GIB,
        })  # fmt: skip
    return rows


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(row[key], fmt) for key, _, fmt in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--computed-only", action="store_true")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16384, help="max_tokens_per_batch for the activation figure")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank of the computed table")
    ap.add_argument("--json", help="also write every figure here")
    ap.add_argument("--child", choices=list(SETUPS), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.out)
        return

    result: dict = {}
    if not args.computed_only:
        with tempfile.TemporaryDirectory(prefix="bigrm-bench-memory-") as tmp:
            model = small_model(Path(tmp))
            result["measured"] = [measure(setup, model, Path(tmp)) for setup in SETUPS]
        print(f"Measured here: {SMALL}, DeepSpeed ZeRO-3, 1 CPU rank, fp32, gradient checkpointing, 4 optimizer "
              "steps of 1024 tokens\n")  # fmt: skip
        print(table(result["measured"], [
            ("setup", "setup", "s"), ("parameters", "parameters", ",d"), ("trainable", "trainable", ",d"),
            ("rss_before_gib", "RSS before model (GiB)", ".2f"), ("peak_rss_gib", "peak RSS (GiB)", ".2f"),
            ("setup_gib", "peak - before (GiB)", ".2f"),
        ]))  # fmt: skip
        print()
    result["computed"] = [
        row for name, arch in BIG.items() for row in computed(name, arch, args.gpus, args.tokens, args.r)
    ]
    print(f"Computed: ZeRO-3 on {args.gpus} GPUs, bf16, AdamW, LoRA r={args.r} on every linear layer, gradient "
          f"checkpointing, {args.tokens} tokens per GPU micro-batch\n")  # fmt: skip
    print(table(result["computed"], [
        ("model", "model", "s"), ("setup", "setup", "s"), ("parameters", "parameters", ",d"),
        ("trainable", "trainable", ",d"), ("bytes_per_param", "bytes / param", ".2f"),
        ("states_gib_total", "weights+grads+optimizer, all GPUs (GiB)", ".1f"),
        ("states_gib_per_gpu", "same, per GPU (GiB)", ".1f"),
        ("activations_gib_per_gpu", "activations / GPU (GiB)", ".1f"),
        ("gib_per_gpu", "total / GPU (GiB)", ".1f"),
    ]))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
