"""bigrm vs TRL's PRMTrainer on process-reward (stepwise) data: one run each, the same rows, model and threads.

    pip install --no-deps --target /tmp/trl_prm trl==1.13.0
    python bench/bench_prm.py [--trl-dir /tmp/trl_prm] [--prompts 64] [--solutions 4] [--threads 2]

TRL dropped PRMTrainer after 1.13.0 (it lived in trl/trainer/prm_trainer.py, then trl/experimental/prm/ until
1.13.0; 1.14.0 has none), so the benchmark imports it from a side install of trl 1.13.0 (--trl-dir, put first on
sys.path of the TRL child process only); the environment's own trl is left as it is.

Data: stepwise rows in TRL's format ({prompt, completions: [step, ...], labels: [bool, ...]}) with realistic lengths:
HH harmless-base prompts (../shared/data), `--solutions` solutions per prompt of 2-6 steps, each step an HH reply
(Math-Shepherd-like: solutions of a few hundred tokens, steps of tens), correct up to a random first error. Each
library trains one epoch on a fresh copy of the same random-initialised tiny Llama (bench/models.py), fp32, in its
own child process (which also gives its peak RSS):
  bigrm   the rows grouped by prompt, packed under --budget tokens with share_prompt (the prompt once per group),
          one forward per micro-batch reading the value head at every step end, step loss (bigrm.objectives.steps)
  trl     PRMTrainer: one padded row per solution, --trl-batch rows per step, a 2-label token classifier
Both take one AdamW step per batch. The two alternate --repeats times (the machine's other load hits both alike) and
the median epoch of each counts. Reported: solutions/s, labelled steps/s and tokens/s (the same numerators for
both: the rows' solutions, their steps and the tokens of each solution's sequence as bigrm tokenises it alone), the
ratio bigrm / TRL, padding efficiency (real tokens / tokens processed; bigrm's shared prompts count once as real)
and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_speed import hh_pieces
from models import write_config

MAX_LENGTH = 1024
TRL_VERSION = "1.13.0"  # the newest trl with PRMTrainer


def step_rows(prompts: int, solutions: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    heads, replies = hh_pieces(300, 120)
    replies = [" ".join(r.split()) for r in replies]  # a step is one line: the separator is the newline
    rows = []
    for _ in range(prompts):
        prompt = rng.choice(heads)
        for _ in range(solutions):
            length = rng.randint(2, 6)
            first_error = rng.randrange(length) if rng.random() < 0.5 else length
            steps = rng.sample(replies, length)
            rows.append({"prompt": prompt, "completions": steps, "labels": [k < first_error for k in range(length)]})
    return rows


def bigrm_epoch(rows_path: str, model_dir: str, budget: int) -> dict:
    from transformers import AutoTokenizer

    from bigrm.config import DataConfig, LossConfig
    from bigrm.data.packing import collate, layout_tokens, pack_bins
    from bigrm.data.rows import load_examples
    from bigrm.data.tokenise import tokenize_examples
    from bigrm.kinds import Steps
    from bigrm.model.reward_model import RewardModel, load_classifier

    tok = AutoTokenizer.from_pretrained(model_dir)
    (examples,), _ = load_examples([rows_path], DataConfig(max_length=MAX_LENGTH))
    groups, _ = tokenize_examples(examples, tok, MAX_LENGTH, "error")
    sizes = [layout_tokens(g, True) for g in groups]
    bins = pack_bins(list(range(len(groups))), sizes, max(budget, max(sizes)), window=len(groups))
    batches = [collate([groups[i] for i in b], tok.pad_token_id, share_prompt=True) for b in bins]
    model = RewardModel(load_classifier(model_dir, torch.float32, "sdpa", tok), "sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    start = time.perf_counter()
    for batch in batches:
        loss, _, _ = Steps("\n").loss(model(batch), batch.labels, LossConfig(), None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    real = sum(b.real_tokens for b in batches)
    return {"seconds": seconds, "padding_efficiency": real / sum(b.processed_tokens for b in batches),
            "optimizer_steps": len(batches)}  # fmt: skip


def trl_epoch(rows_path: str, model_dir: str, batch_size: int, out: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.prm import PRMConfig, PRMTrainer

    rows = [json.loads(line) for line in Path(rows_path).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model_dir)
    # the same weights; the head is new (2 labels where the saved classifier has 1), as for a PRM from a base model
    model = AutoModelForTokenClassification.from_pretrained(
        model_dir, num_labels=2, dtype=torch.float32, ignore_mismatched_sizes=True
    )
    args = PRMConfig(
        output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=1, max_length=MAX_LENGTH,
        max_completion_length=None, learning_rate=1e-5, logging_strategy="no", save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=True, seed=0, bf16=False, gradient_checkpointing=False,
        step_separator="\n",
    )  # fmt: skip
    trainer = PRMTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    lengths = [len(r["input_ids"]) for r in trainer.train_dataset]
    if max(lengths) >= MAX_LENGTH:
        raise SystemExit("TRL truncated rows at max_length: the comparison is off")
    real = total = 0
    for batch in trainer.get_train_dataloader():
        mask = batch["attention_mask"]
        real, total = real + int(mask.sum()), total + mask.numel()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "padding_efficiency": real / total, "optimizer_steps": trainer.state.global_step}


def child(args) -> None:
    """One library's epoch in this process; a JSON line with its figures and peak resident memory."""
    name, rows_path, model_dir = args.child
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        if name == "bigrm":
            figures = bigrm_epoch(rows_path, model_dir, args.budget)
        else:
            figures = trl_epoch(rows_path, model_dir, args.trl_batch, out)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so it would report the parent's size
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({**figures, "peak_rss_mib": int(hwm.split()[1]) / 1024}))


def run_child(name: str, rows_path: str, model_dir: str, args) -> dict:
    import os

    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1")
    if name == "trl":  # the side install first, for this process only
        env["PYTHONPATH"] = os.pathsep.join([args.trl_dir, env.get("PYTHONPATH", "")])
    argv = [sys.executable, __file__, "--child", name, rows_path, model_dir, "--threads", str(args.threads),
            "--budget", str(args.budget), "--trl-batch", str(args.trl_batch)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def counts(rows_path: str, model_dir: str) -> dict:
    """The numerators: solutions, labelled steps, tokens of each solution's sequence alone."""
    from transformers import AutoTokenizer

    from bigrm.config import DataConfig
    from bigrm.data.rows import load_examples
    from bigrm.data.tokenise import tokenize_examples

    (examples,), _ = load_examples([rows_path], DataConfig(max_length=MAX_LENGTH))
    groups, _ = tokenize_examples(examples, AutoTokenizer.from_pretrained(model_dir), MAX_LENGTH, "error")
    return {
        "solutions": sum(len(g.seqs) for g in groups),
        "steps": sum(len(s) for g in groups for s in g.steps),
        "tokens": sum(g.num_tokens for g in groups),
        "groups": len(groups),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--solutions", type=int, default=4, help="solutions (rows) per prompt")
    p.add_argument("--budget", type=int, default=2048, help="bigrm max_tokens_per_batch (raised to the largest group)")
    p.add_argument("--trl-batch", dest="trl_batch", type=int, default=8, help="TRL rows per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each library; the median counts")
    p.add_argument(
        "--trl-dir", dest="trl_dir", default="/tmp/trl_prm", help=f"a --target install of trl=={TRL_VERSION}"
    )
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if not (Path(args.trl_dir) / "trl" / "experimental" / "prm").is_dir():
        raise SystemExit(f"no PRMTrainer under {args.trl_dir}: pip install --no-deps --target {args.trl_dir} "
                         f"trl=={TRL_VERSION}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bigrm-bench-prm-") as tmp:
        from bigrm.model.reward_model import write_random_init

        model_dir = str(Path(tmp) / "model")
        write_random_init(str(write_config("tiny", Path(tmp) / "tiny")), model_dir, seed=0)
        rows_path = str(Path(tmp) / "rows.jsonl")
        Path(rows_path).write_text("".join(json.dumps(r) + "\n" for r in step_rows(args.prompts, args.solutions, 0)))
        n = counts(rows_path, model_dir)
        runs = [
            {name: run_child(name, rows_path, model_dir, args) for name in ("bigrm", "trl")}
            for _ in range(args.repeats)
        ]
    figures = {}
    for name in ("bigrm", "trl"):
        mine = sorted((r[name] for r in runs), key=lambda f: f["seconds"])
        figures[name] = {**mine[len(mine) // 2], "all_seconds": [r[name]["seconds"] for r in runs]}
        figures[name]["peak_rss_mib"] = max(f["peak_rss_mib"] for f in mine)
    print(
        f"tiny Llama, fp32, {args.threads} threads, median of {args.repeats}, {n['solutions']} solutions "
        f"({n['groups']} prompt groups), {n['steps']} labelled steps, {n['tokens']} tokens; bigrm budget "
        f"{args.budget} tokens with share_prompt, TRL {TRL_VERSION} PRMTrainer {args.trl_batch} rows per step, "
        f"torch {torch.__version__}"
    )
    header = ["solutions/s", "steps/s", "tokens/s", "opt steps", "padding eff", "peak RSS MiB"]
    print(f"{'':8}" + "".join(f"{h:>13}" for h in header))
    for name, f in figures.items():
        s = f["seconds"]
        f.update(solutions_per_s=n["solutions"] / s, steps_per_s=n["steps"] / s, tokens_per_s=n["tokens"] / s)
        print(f"{name:8}{f['solutions_per_s']:>13.1f}{f['steps_per_s']:>13.1f}{f['tokens_per_s']:>13.0f}"
              f"{f['optimizer_steps']:>13}{f['padding_efficiency']:>13.3f}{f['peak_rss_mib']:>13.0f}")  # fmt: skip
    ratio = figures["trl"]["seconds"] / figures["bigrm"]["seconds"]
    print(f"bigrm / TRL throughput (solutions, steps and tokens alike): {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": n, "figures": figures, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
