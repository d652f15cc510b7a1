"""What the trainer logs every `train.log_every` steps: the window's loss statistics and its throughput.

A window runs from one log line to the next; its wall time leaves out evaluation and saving (`paused`), which are
not training throughput. Every figure is summed over ranks in one all_reduce when the window is read.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import astuple, dataclass

import torch

from bigrm import dist
from bigrm.config import LossConfig
from bigrm.data.packing import PackedBatch
from bigrm.kinds import RewardKind, Scalar
from bigrm.objectives.ranking import Stats, metrics


@dataclass
class Tokens:
    """Additive over micro-batches and ranks."""

    real: float = 0.0  # tokens of the scored sequences (shared prefixes once)
    processed: float = 0.0  # tokens forwarded, alignment padding included
    budget: float = 0.0  # max_tokens_per_batch per micro-batch
    model_flops: float = 0.0  # see bigrm.model.flops


class Meter:
    def __init__(self, device: torch.device, budget: int, peak_tflops: float | None, kind: RewardKind | None = None):
        self.device, self.budget, self.peak, self.kind = device, budget, peak_tflops, kind or Scalar()
        self.stats, self.tokens = Stats.zeros(device), Tokens()
        self.sums = self.kind.new_sums(device)  # the kind's additive sums beside the ranking statistics, or None
        self.clock = time.perf_counter()

    def add(self, stats: Stats, batch: PackedBatch, model_flops: float, sums: torch.Tensor | None = None) -> None:
        """One micro-batch of this rank: its statistics and (`sums`) what its kind's loss summed."""
        self.stats += stats
        if sums is not None:
            self.sums += sums
        t = self.tokens
        t.real, t.processed = t.real + batch.real_tokens, t.processed + batch.processed_tokens
        t.budget, t.model_flops = t.budget + self.budget, t.model_flops + model_flops

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count as training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.clock += time.perf_counter() - start

    def read(self, cfg: LossConfig, lr: float) -> dict[str, float]:
        """Collective: the window's figures over all ranks; the next window starts now."""
        local = torch.tensor(astuple(self.tokens), dtype=torch.float64, device=self.device)
        sums = [] if self.sums is None else [self.sums.flatten()]
        stats, tokens, *sums = (x.cpu() for x in dist.all_sum_each(self.stats.stack(), local, *sums))
        elapsed, world = time.perf_counter() - self.clock, dist.world()
        t = Tokens(*tokens.tolist())
        logged = metrics(Stats.unstack(stats), cfg, self.kind.loss_terms(sums[0] if sums else None, cfg))
        logged.update(
            lr=lr,
            tokens_per_s=t.real / elapsed,
            tokens_per_s_per_gpu=t.real / elapsed / world,
            padding_efficiency=t.real / t.processed,
            budget_fill=t.real / t.budget,
            tflops_per_gpu=t.model_flops / elapsed / world / 1e12,
        )
        if sums:
            logged.update(self.kind.train_metrics(sums[0]))
        if self.peak:
            logged["mfu"] = logged["tflops_per_gpu"] / self.peak
        if self.device.type == "cuda":  # this rank's high-water mark since the start: what a larger run must fit in
            logged["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.stats, self.tokens, self.sums = Stats.zeros(self.device), Tokens(), self.kind.new_sums(self.device)
        self.clock = time.perf_counter()
        return logged
