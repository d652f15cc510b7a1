"""Throughput, MFU and peak memory of the real trainer on one GPU, on real K = 4 ranked data.

    pip install -e ".[bench,qlora]"    # adds deepspeed, datasets, trl and bitsandbytes to torch/transformers/peft
    python bench/bench_gpu.py --setups 1b-full --json 1b.json
    python bench/bench_gpu.py --setups 7b-qlora --steps 40 --warmup 15 --json 7b.json
    python bench/bench_gpu.py --setups 1b-full --attn varlen flex --json attn.json    # kernels side by side
    python bench/bench_gpu.py --setups 1b-full --compile --json compiled.json     # compiled transformer blocks

Setups (each a child process `python launch/train.py --config bigrm/recipes/llama-7b.yaml ...`, one rank, ZeRO-3 on
one GPU, bf16, weights random-initialised by the trainer from a config written here):
  1b-full    TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads), every weight trained,
             gradient checkpointing off unless --gradient-checkpointing
  7b-qlora   Llama-2-7B's shape, 4-bit NF4 base + LoRA r=16 on every linear layer, gradient checkpointing on
Data: Anthropic HH harmless-base prompts with K = 4 HH completions each (as bench_speed.py draws them), written as
ranked JSONL rows, enough for --steps micro-batches of --max_tokens_per_batch tokens. The tokenizer is bigrm's
built-in byte-level one (ids < 512), so sequences are longer in tokens than with Llama's own tokenizer. Each run's
directory (kept with --out) holds its log.jsonl and the trainer's output, train.out; its command is printed.
Figures are the trainer's own log windows (D/log.jsonl, every --log_every steps; evaluation and saving excluded):
the median over windows starting at step --warmup or later (earlier steps include compilation and allocator warm-up),
peak memory the largest torch.cuda.max_memory_allocated logged. MFU uses the trainer's model FLOPs (no
recomputation, no padding) over the GPU's dense bf16 peak (bigrm.model.flops).

The optimizer is torch's fused AdamW under DeepSpeed (no CUDA toolkit needed). --size tiny --device cpu only
smoke-tests this script on CPU (tests/test_bench.py): the figures mean nothing there (MFU against a nominal
1 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench_memory import setup_row, table
from bench_speed import MAX_LENGTH, make_groups
from models import SHAPES, write_config

from bigrm.config import ATTN_IMPLS

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "bigrm" / "recipes" / "llama-7b.yaml"
K = 4
TARGET_MFU = {"1b-full": 0.40}  # the target


@dataclass(frozen=True)
class Setup:
    size: str
    args: tuple[str, ...]
    gradient_checkpointing: bool


SETUPS = {
    "1b-full": Setup("1b", (), False),
    "7b-qlora": Setup("7b", ("--lora.r", "16", "--quantization.bits", "4"), True),
}


def write_data(path: Path, model_dir: Path, steps: int, budget: int) -> int:
    """Ranked rows of K HH completions per prompt, enough for `steps` micro-batches when packed as the trainer packs
    them; returns how many rows. Groups larger than the budget are left out (the trainer would stop on them)."""
    from transformers import AutoTokenizer

    from bigrm.data.packing import pack_bins
    from bigrm.data.tokenise import tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n = 64
    while True:
        # the trainer rejects a prompt whose completions repeat; HH has short ones ("No.") many times over
        examples = [ex for ex in make_groups(K, n, seed=K, long_prompt=False) if len(set(ex.completions)) == K]
        groups, _ = tokenize_examples(examples, tokenizer, MAX_LENGTH, "error")
        sizes = [g.num_tokens for g in groups]
        kept = [i for i, size in enumerate(sizes) if size <= budget]
        if not kept:
            raise SystemExit(f"no {K}-completion HH group fits --max_tokens_per_batch {budget}")
        if len(pack_bins(kept, sizes, budget, window=1024)) > 1.1 * steps:  # shuffled windows pack a little worse
            break
        n = max(2 * n, math.ceil(1.3 * steps * budget / statistics.mean(sizes)))
    rows = [{"prompt": examples[i].prompt, "ranked_outputs": list(examples[i].completions)} for i in kept]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def checkpointing(setup: str, args) -> bool:
    return SETUPS[setup].gradient_checkpointing if args.gradient_checkpointing is None else args.gradient_checkpointing


def command(setup: str, model_dir: Path, data: Path, out: Path, attn: str, args) -> list[str]:
    cmd = [
        sys.executable, str(REPO / "launch" / "train.py"), "--config", str(RECIPE), "--output_dir", str(out),
        "--train.overwrite_output_dir", "true",
        "--model.path", str(model_dir), "--model.random_init", "true", "--model.attn_impl", attn,
        "--model.compile", str(args.compile).lower(),
        "--model.gradient_checkpointing", str(checkpointing(setup, args)).lower(),
        "--data.train_files", json.dumps([str(data)]), "--data.eval_files", "[]",
        "--data.max_length", str(MAX_LENGTH),  # what the rows were sized for; the tiny shape has 1024 positions
        "--train.deepspeed_config", "ds_configs/zero3.json", "--train.max_tokens_per_batch", str(args.budget),
        "--train.max_steps", str(args.steps), "--train.log_every", str(args.log_every), "--train.eval_every", "0",
        "--train.report_to", "none", "--train.export", "false", *SETUPS[setup].args,
    ]  # fmt: skip
    if args.device == "cpu":  # no known peak on CPU: a nominal one, so the mfu key is logged and parsed
        cmd += ["--train.peak_tflops", "1"]
    return cmd


def child_env(device: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes a GPU whenever it sees one
        env.setdefault("OMP_NUM_THREADS", "2")
    return env


def summarise(log: Path, warmup: int, steps: int) -> dict:
    """Medians over the train windows that start at or after step `warmup`; the largest logged peak memory."""
    train = [r for r in map(json.loads, log.read_text().splitlines()) if r["split"] == "train"]
    if not train or train[-1]["step"] < steps:
        raise SystemExit(f"{log}: the run stopped before step {steps} (too little data?)")
    starts = [0] + [r["step"] for r in train[:-1]]
    kept = [r for r, start in zip(train, starts, strict=True) if start >= warmup]
    if not kept:
        raise SystemExit(f"{log}: no log window starts after --warmup {warmup}: raise --steps")

    def median(key: str) -> float | None:
        return statistics.median(r[key] for r in kept) if key in kept[0] else None

    keys = ("tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "padding_efficiency", "budget_fill")
    peaks = [r["peak_memory_gib"] for r in train if "peak_memory_gib" in r]
    return {"windows": len(kept), **{k: median(k) for k in keys}, "peak_memory_gib": max(peaks) if peaks else None}


def run_one(setup: str, attn: str, size: str, model_dir: Path, data: Path, work: Path, args) -> dict:
    out = work / f"{setup}-{attn}{'-compiled' if args.compile else ''}"
    cmd = command(setup, model_dir, data, out, attn, args)
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    shutil.rmtree(out, ignore_errors=True)  # the trainer appends to log.jsonl: a reused --out must not mix runs
    out.mkdir(parents=True)
    with open(out / "train.out", "w") as fh:  # progress bars and logs: kept beside log.jsonl, shown on failure
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(args.device), stdout=fh, stderr=subprocess.STDOUT)
    text = (out / "train.out").read_text()
    if proc.returncode:
        raise SystemExit(f"{setup} attn={attn} failed ({proc.returncode}):\n{text[-4000:]}")
    for heavy in ("checkpoints", "random-init"):  # the final ZeRO-3 checkpoint of a 1B run alone is ~14 GB
        shutil.rmtree(out / heavy, ignore_errors=True)
    ran = setup_row(out / "log.jsonl")
    return {
        "setup": setup, "size": size, "attn": attn, "attn_resolved": ran["attention"],
        "compile": args.compile, "gradient_checkpointing": checkpointing(setup, args),
        "parameters": ran["parameters"], "trainable": ran["trainable"],
        **summarise(out / "log.jsonl", args.warmup, args.steps), "command": shlex.join(cmd),
    }  # fmt: skip


COLUMNS = [
    ("setup", "setup", "s"), ("attn", "attn", "s"), ("compile", "compile", ""), ("gradient_checkpointing", "GC", ""),
    ("parameters", "parameters", ",d"), ("tokens_per_s_per_gpu", "tokens/s/GPU", ",.0f"),
    ("tflops_per_gpu", "TFLOP/s/GPU", ".1f"), ("mfu", "MFU", ".1%"), ("peak_memory_gib", "peak memory GiB", ".1f"),
    ("padding_efficiency", "padding eff", ".3f"), ("budget_fill", "budget fill", ".3f"),
]  # fmt: skip


def report(runs: list[dict]) -> str:
    shown = []
    for r in runs:
        row = {key: "-" if r[key] is None else format(r[key], fmt) for key, _, fmt in COLUMNS}
        row["attn"] = r["attn"] if r["attn"] == r["attn_resolved"] else f"{r['attn']} ({r['attn_resolved']})"
        shown.append(row)
    return table(shown, [(key, title, "s") for key, title, _ in COLUMNS])


def gpu_name() -> str:
    """From nvidia-smi: asking torch here would hold a CUDA context in this process while the children train."""
    if shutil.which("nvidia-smi") is None:
        return "unknown GPU"
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"]
    return subprocess.run(query, capture_output=True, text=True).stdout.strip() or "unknown GPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    p.add_argument("--attn", nargs="+", default=["auto"], choices=ATTN_IMPLS, help="model.attn_impl, one run each")
    p.add_argument("--compile", action="store_true", help="model.compile: torch.compile each transformer block")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   help="for every setup (default: off for 1b-full, on for 7b-qlora)")  # fmt: skip
    p.add_argument("--max_tokens_per_batch", dest="budget", type=int, default=16384)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the figures")
    p.add_argument("--log_every", type=int, default=5, help="steps per log window")
    p.add_argument("--size", choices=list(SHAPES), help="one model shape for every setup (tiny: smoke tests)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke tests only")
    p.add_argument("--out", help="keep run directories (logs, train.out, data) here; default: a temporary one")
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args()

    work = Path(args.out or tempfile.mkdtemp(prefix="bigrm-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sizes = {name: args.size or SETUPS[name].size for name in args.setups}
        models = {size: write_config(size, work / f"model-{size}") for size in set(sizes.values())}
        data = work / f"hh-k{K}.jsonl"
        rows = write_data(data, next(iter(models.values())), args.steps, args.budget)  # one tokenizer for all
        device = gpu_name() if args.device == "cuda" else "CPU"
        print(f"{device}; {rows} HH prompts with K = {K}; {args.steps} steps of {args.budget} tokens, figures from "
              f"step {args.warmup} on (windows of {args.log_every})", flush=True)  # fmt: skip
        runs = [run_one(s, a, sizes[s], models[sizes[s]], data, work, args) for s in args.setups for a in args.attn]
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + report(runs))
    for r in runs:
        target = TARGET_MFU.get(r["setup"])
        if args.device == "cuda" and target and r["mfu"] is not None and r["size"] == SETUPS[r["setup"]].size:
            verdict = "met" if r["mfu"] >= target else "missed"
            print(f"target MFU >= {target:.0%} for {r['setup']} ({r['attn']}): {r['mfu']:.1%}, {verdict}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "out")}
        Path(args.json).write_text(json.dumps({"device": device, "settings": settings, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
