"""bigrm vs TRL's RewardTrainer: one run, the same data, the same model, the same threads or GPU.

    python bench/bench_speed.py            (needs `pip install -e ".[bench]"` for TRL)
    python bench/bench_speed.py --device cuda --size 1b \
        --data K=2 K=4 --prompts 512 256 64 --budget 16384 --trl-batch 16 --repeats 3 --skip-loss-share

Data: real prompts and completions of the Anthropic HH harmless-base test split (../shared/data), arranged in groups
of K completions per prompt (K = 2, 4, 8), and a long-prompt variant (several HH prompts joined, ~11x a completion).
Per training step every variant runs forward, loss, backward and an AdamW step on a fresh copy of the same model:
  bigrm          packed micro-batches, each completion forwarded once, the fused K-wise loss
  bigrm+share    the same with share_prompt (each prompt encoded once per group)
  trl-all        TRL RewardTrainer on every group expanded to all C(K,2) pairs
  trl-adjacent   TRL on the K-1 adjacent pairs only (the cheapest honest baseline)
Reported per data set: prompts/s, real tokens/s (tokens of the distinct scored sequences, the same numerator for all
variants), the ratio bigrm / each TRL variant (median of interleaved repeats, with min-max), padding efficiency
(non-pad tokens / tokens processed), sequences forwarded per prompt, and peak RSS (each variant alone in a child
process; on CUDA torch.cuda.max_memory_allocated while the variant trains). Then the fused loss alone, K = 2 ... 64,
and its share of a training step.

Precision and gradient checkpointing are the same for both libraries: --dtype (default fp32 on CPU, bf16 on CUDA:
bf16 weights for both, TRL with bf16=True) and --gradient-checkpointing (default off). TRL's own RewardConfig defaults
(bf16 autocast, on CPU too, and gradient checkpointing) are overridden, since they would slow TRL down for reasons
that are not the comparison's. On CUDA bigrm runs
the attention --attn resolves to (auto: flash-attn, else torch's varlen kernel, else FlexAttention); TRL its default
(SDPA over padded rows). --size 1b is TinyLlama-1.1B's shape (bench/models.py), random-initialised.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch
from models import write_config

from bigrm import precision
from bigrm.config import ATTN_IMPLS, LossConfig
from bigrm.data.examples import Example
from bigrm.data.formats import split_implicit
from bigrm.data.labels import Labels
from bigrm.data.packing import collate, layout_tokens, pack_bins
from bigrm.data.tokenise import tokenize_examples
from bigrm.model.attention import read_attention_needs, resolve_attn
from bigrm.model.reward_model import RewardModel, load_classifier, write_random_init
from bigrm.objectives.ranking import ranking_loss

# BIGRM_HH_DATA: elsewhere than ../shared/data, as on the GPU machine, where only the repository travels
HH = Path(
    os.environ.get("BIGRM_HH_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
)
MAX_LENGTH = 1024


@dataclass(frozen=True)
class Run:
    """Where and how every variant trains."""

    device: torch.device
    dtype: torch.dtype  # both libraries' weights and compute
    checkpointing: bool  # both libraries
    attn: str  # bigrm's attention

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def run_settings(args) -> Run:
    cuda = args.device == "cuda"
    return Run(
        device=torch.device(args.device),
        dtype=precision.training(args.dtype or "auto", cuda),
        checkpointing=args.gradient_checkpointing,
        attn=resolve_attn(args.attn, cuda, read_attention_needs("")),  # Llamas, as the built-in one: plain causal
    )


def clock(device: torch.device) -> float:
    """perf_counter once the device has finished the work queued so far (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def hh_pieces(max_prompt: int, max_completion: int) -> tuple[list[str], list[str]]:
    """HH prompts and completions (text cut at the last assistant turn), within the given character lengths."""
    prompts, completions = [], []
    with gzip.open(HH, "rt") as fh:
        for line in fh:
            row = json.loads(line)
            split = split_implicit(row["chosen"], row["rejected"], "\n\nAssistant:")
            if isinstance(split, str):
                continue
            prompt, *outs = split
            if len(prompt) <= max_prompt:
                prompts.append(prompt)
            completions += [c for c in outs if 1 < len(c.strip()) and len(c) <= max_completion]
    return prompts, completions


def make_groups(k: int, n: int, seed: int, long_prompt: bool) -> list[Example]:
    rng = random.Random(seed)
    prompts, completions = hh_pieces(400, 200)
    examples = []
    for i in range(n):
        prompt = rng.choice(prompts)
        if long_prompt:  # TL;DR-like: the prompt ~11x a completion
            mean = sum(map(len, completions)) / len(completions)
            while len(prompt) < 11 * mean:
                prompt = rng.choice(prompts) + prompt
        outs = rng.sample(completions, k)
        examples.append(Example(prompt, tuple(outs), f"bench:{i}", Labels(tuple(range(k)))))
    return examples


class BigrmVariant:
    def __init__(self, model_dir: str, examples: list[Example], share: bool, budget: int, run: Run):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.groups, _ = tokenize_examples(examples, self.tok, MAX_LENGTH, "error")
        self.model_dir, self.share, self.budget, self.settings = model_dir, share, budget, run
        sizes = [layout_tokens(g, share) for g in self.groups]
        self.bins = pack_bins(list(range(len(self.groups))), sizes, budget, window=len(self.groups))
        self.batches = [
            collate([self.groups[i] for i in b], self.tok.pad_token_id, share_prompt=share) for b in self.bins
        ]

    def run(self) -> float:
        model = load_model(self.model_dir, self.tok, self.settings)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        device = self.settings.device
        start = clock(device)
        for packed in self.batches:
            batch = packed.to(device)
            loss, _ = ranking_loss(model(batch), batch.labels, LossConfig())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return clock(device) - start

    def padding_efficiency(self) -> float:
        return sum(b.real_tokens for b in self.batches) / sum(b.processed_tokens for b in self.batches)

    def sequences_per_prompt(self) -> float:
        return sum(len(g.seqs) for g in self.groups) / len(self.groups)


def load_model(model_dir: str, tokenizer, run: Run) -> RewardModel:
    classifier = load_classifier(model_dir, run.dtype, run.attn, tokenizer, run.checkpointing)
    return RewardModel(classifier, run.attn).to(run.device).train()


def trl_config(out: str, batch_size: int, run: Run):
    from trl import RewardConfig

    return RewardConfig(
        output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=1, max_length=MAX_LENGTH,
        learning_rate=1e-5, logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not run.cuda, seed=0, bf16=run.dtype == torch.bfloat16,
        gradient_checkpointing=run.checkpointing,
    )  # fmt: skip


class TrlVariant:
    def __init__(self, model_dir: str, examples: list[Example], adjacent: bool, batch_size: int, out: str, run: Run):
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import RewardTrainer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        rows = []
        for ex in examples:
            k = len(ex.completions)
            for i, j in [(i, i + 1) for i in range(k - 1)] if adjacent else combinations(range(k), 2):
                rows.append({"prompt": ex.prompt, "chosen": ex.completions[i], "rejected": ex.completions[j]})
        self.pairs, self.prompts = len(rows), len(examples)
        self.args, self.settings = trl_config(out, batch_size, run), run
        self.model_dir, self.dataset = model_dir, Dataset.from_list(rows)
        self.trainer_cls = RewardTrainer
        trainer = self._trainer()  # not kept: on a GPU its model would count in every later variant's memory
        kept = len(trainer.train_dataset)
        if kept != self.pairs:
            raise SystemExit(f"TRL dropped {self.pairs - kept} pairs longer than max_length: the comparison is off")
        self._padding = self._measure_padding(trainer)

    def _trainer(self):
        from transformers import AutoModelForSequenceClassification
        from transformers.trainer_callback import PrinterCallback

        model = AutoModelForSequenceClassification.from_pretrained(self.model_dir, dtype=self.settings.dtype)
        trainer = self.trainer_cls(model=model, args=self.args, train_dataset=self.dataset, processing_class=self.tok)
        trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line is noise here
        return trainer

    @staticmethod
    def _measure_padding(trainer) -> float:
        real = total = 0
        for batch in trainer.get_train_dataloader():
            mask = batch["attention_mask"]
            real, total = real + int(mask.sum()), total + mask.numel()
        return real / total

    def run(self) -> float:
        trainer = self._trainer()  # a fresh model, as for bigrm
        start = clock(self.settings.device)
        trainer.train()
        return clock(self.settings.device) - start

    def padding_efficiency(self) -> float:
        return self._padding

    def sequences_per_prompt(self) -> float:
        return 2 * self.pairs / self.prompts


def budget_for(examples: list[Example], model_dir: str, budget: int) -> int:
    """The bigrm token budget: at least the largest group, so every data set packs."""
    from transformers import AutoTokenizer

    groups, _ = tokenize_examples(examples, AutoTokenizer.from_pretrained(model_dir), MAX_LENGTH, "error")
    return max(budget, max(g.num_tokens for g in groups))


def build(name: str, model_dir: str, examples: list[Example], args, out: str):
    run = run_settings(args)
    if name.startswith("bigrm"):
        budget = budget_for(examples, model_dir, args.budget)
        return BigrmVariant(model_dir, examples, share=name == "bigrm+share", budget=budget, run=run)
    return TrlVariant(model_dir, examples, adjacent=name == "trl-adjacent", batch_size=args.trl_batch, out=out, run=run)


VARIANTS = ["bigrm", "bigrm+share", "trl-all", "trl-adjacent"]
DATA_SETS = ["K=2", "K=4", "K=8", "K=4 long prompt"]


def data_sets(args) -> dict[str, list[Example]]:
    """The data sets named by --data, in the order above: (K, prompts, seed, long prompts) each."""
    specs = {f"K={k}": (k, args.prompts[i], k, False) for i, k in enumerate((2, 4, 8))}
    specs["K=4 long prompt"] = (4, args.prompts[1], 44, True)
    return {name: make_groups(*specs[name]) for name in DATA_SETS if name in args.data}


def timed(variant, device: torch.device) -> tuple[float, float | None]:
    """Seconds of one epoch and, on CUDA, the memory (MiB) allocated at the peak meanwhile."""
    if device.type != "cuda":
        return variant.run(), None
    gc.collect()  # a finished TRL trainer sits in reference cycles: its model and optimizer would count here
    torch.cuda.reset_peak_memory_stats(device)
    seconds = variant.run()
    return seconds, torch.cuda.max_memory_allocated(device) / 2**20


def peak_rss_mib(name: str, data: str, model_dir: str, argv: list[str]) -> float:
    """The variant alone in a child process: its peak resident memory."""
    cmd = [sys.executable, __file__, *argv, "--rss-child", name, data, model_dir]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def loss_share(model_dir: str, budget: int, repeats: int, run: Run) -> list[tuple[int, float, float]]:
    """(K, ms of the fused loss forward+backward, ms of a whole step) for a budget-sized micro-batch of K-groups."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, tok, run)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = []
    for k in (2, 4, 8, 16, 32, 64):
        examples = make_groups(k, 8, seed=k, long_prompt=False)
        groups, _ = tokenize_examples(examples, tok, MAX_LENGTH, "error")
        groups = [
            type(g)(tuple(s[: max(2, budget // (k * 4))] for s in g.seqs), 0.0, g.source) for g in groups
        ]  # short sequences, so several K=64 groups fit one micro-batch: the hardest case for the loss's share
        chosen, used = [], 0
        for g in groups:
            if used + g.num_tokens <= budget:
                chosen.append(g)
                used += g.num_tokens
        batch = collate(chosen, tok.pad_token_id).to(run.device)
        step_times, loss_times = [], []
        for _ in range(repeats):
            start = clock(run.device)
            rewards = model(batch)
            loss, _ = ranking_loss(rewards, batch.labels, LossConfig())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_times.append(clock(run.device) - start)
            fake = torch.randn(len(batch.last_index), requires_grad=True, device=run.device)
            start = clock(run.device)
            ranking_loss(fake, batch.labels, LossConfig())[0].backward()
            loss_times.append(clock(run.device) - start)
        rows.append((k, 1000 * statistics.median(loss_times), 1000 * statistics.median(step_times)))
    return rows


def describe(run: Run, tmp: str) -> str:
    """How each library trains in this run, as TRL's config resolves its defaults."""
    trl = trl_config(str(Path(tmp) / "describe"), 1, run)
    dtype = precision.name_of(run.dtype)
    bigrm = f"bigrm: {run.attn} attention, {dtype}"
    weights = f"{dtype} weights" + (", bf16 mixed precision" if trl.bf16 else "")
    checkpointing = {True: "gradient checkpointing", False: "no gradient checkpointing"}
    return (f"{bigrm}, {checkpointing[run.checkpointing]}; TRL: SDPA over padded rows, {weights}, "
            f"{checkpointing[trl.gradient_checkpointing]}")  # fmt: skip


def compare(data: str, examples: list[Example], model_dir: str, args, tmp: str, run: Run) -> dict:
    """Every variant on one data set: warm-up, interleaved timed repeats, figures and speed-ups."""
    variants = {n: build(n, model_dir, examples, args, str(Path(tmp) / n)) for n in VARIANTS}
    for v in variants.values():  # warm-up: first-call allocations and lazy inits are not part of the figures
        timed(v, run.device)
    times, peaks = {n: [] for n in VARIANTS}, {n: [] for n in VARIANTS}
    for _ in range(args.repeats):
        for n, v in variants.items():
            seconds, peak = timed(v, run.device)
            times[n].append(seconds)
            peaks[n].append(peak)
    real_tokens = sum(g.num_tokens for g in variants["bigrm"].groups)
    argv = sys.argv[1:]  # the RSS child rebuilds the same data sets
    rows = {}
    for n, v in variants.items():
        med = statistics.median(times[n])
        if run.cuda:
            memory = {"peak_gpu_mib": max(peaks[n])}
        else:
            memory = {"peak_rss_mib": peak_rss_mib(n, data, model_dir, argv)}
        rows[n] = {
            "prompts_per_s": len(examples) / med,
            "real_tokens_per_s": real_tokens / med,
            "padding_efficiency": v.padding_efficiency(),
            "sequences_per_prompt": v.sequences_per_prompt(),
            **memory,
            "times": times[n],
        }
    for n in ("bigrm", "bigrm+share"):
        for base in ("trl-all", "trl-adjacent"):
            ratios = [b / a for a, b in zip(times[n], times[base], strict=True)]  # speed-up per repeat
            rows[n][f"vs_{base}"] = (statistics.median(ratios), min(ratios), max(ratios))
    print(f"== {data}: {len(examples)} prompts, {real_tokens} real tokens")
    print_rows(rows, run.cuda)
    return rows


def print_rows(rows: dict, cuda: bool) -> None:
    memory, title = ("peak_gpu_mib", "GPU MiB") if cuda else ("peak_rss_mib", "RSS MiB")
    print(f"{'variant':<14}{'prompts/s':>11}{'tokens/s':>11}{'pad eff':>9}{'seq/prompt':>11}{title:>9}"
          f"{'÷ trl-all (min-max)':>24}{'÷ trl-adjacent (min-max)':>27}")  # fmt: skip
    for n, r in rows.items():
        line = (f"{n:<14}{r['prompts_per_s']:>11.2f}{r['real_tokens_per_s']:>11.0f}{r['padding_efficiency']:>9.3f}"
                f"{r['sequences_per_prompt']:>11.1f}{r[memory]:>9.0f}")  # fmt: skip
        for base in ("trl-all", "trl-adjacent"):
            if f"vs_{base}" in r:
                med, lo, hi = r[f"vs_{base}"]
                line += f"{f'{med:.2f}x ({lo:.2f}-{hi:.2f})':>{24 if base == 'trl-all' else 27}}"
        print(line)
    print()


def rss_child(args) -> None:
    """One variant's epoch in this process, then its peak resident memory (MiB) on the last line."""
    name, data, model_dir = args.rss_child
    with tempfile.TemporaryDirectory() as out:
        build(name, model_dir, data_sets(args)[data], args, out).run()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so it would report the parent's size
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(int(hwm.split()[1]) / 1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats per variant (median reported)")
    p.add_argument("--prompts", type=int, nargs=3, default=[64, 32, 16], help="prompts for K = 2, 4, 8")
    p.add_argument("--budget", type=int, default=2048, help="bigrm max_tokens_per_batch (raised to the largest group)")
    p.add_argument("--trl-batch", dest="trl_batch", type=int, default=8, help="TRL pairs per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=precision.CHOICES, help="both libraries' weights and compute (see above)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="both libraries")  # fmt: skip
    p.add_argument("--size", choices=["tiny", "1b"], default="tiny", help="the model's shape (bench/models.py)")
    p.add_argument("--attn", choices=ATTN_IMPLS, default="auto", help="bigrm's attention (auto: sdpa on CPU)")
    p.add_argument("--data", nargs="+", choices=DATA_SETS, default=DATA_SETS, help="the data sets to measure")
    p.add_argument("--skip-loss-share", dest="skip_loss_share", action="store_true")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.rss_child:
        rss_child(args)
        return

    run = run_settings(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bigrm-bench-") as tmp:
        model_dir = str(Path(tmp) / "model")
        write_random_init(str(write_config(args.size, Path(tmp) / args.size)), model_dir, seed=0, dtype=run.dtype)
        where = torch.cuda.get_device_name(run.device) if run.cuda else f"{args.threads} threads"
        print(f"{args.size} Llama, {where}, {args.repeats} interleaved repeats, bigrm budget {args.budget} tokens, "
              f"TRL {args.trl_batch} pairs per step, torch {torch.__version__}\n{describe(run, tmp)}\n")  # fmt: skip
        for data, examples in data_sets(args).items():
            results[data] = compare(data, examples, model_dir, args, tmp, run)
        if not args.skip_loss_share:
            print("== the fused loss alone (forward + backward) vs a whole bigrm step, one budget-sized micro-batch")
            print(f"{'K':>4}{'loss ms':>10}{'step ms':>10}{'share':>9}")
            for k, loss_ms, step_ms in loss_share(model_dir, args.budget, args.repeats, run):
                print(f"{k:>4}{loss_ms:>10.3f}{step_ms:>10.1f}{100 * loss_ms / step_ms:>8.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
