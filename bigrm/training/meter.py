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
from bigrm.evaluation.ratings import train_metrics
from bigrm.model.heads import AttributeHead
from bigrm.objectives.ranking import Stats, metrics


@dataclass
class Tokens:
    """Additive over micro-batches and ranks."""

    real: float = 0.0  # tokens of the scored sequences (shared prefixes once)
    processed: float = 0.0  # tokens forwarded, alignment padding included
    budget: float = 0.0  # max_tokens_per_batch per micro-batch
    model_flops: float = 0.0  # see bigrm.model.flops


class Meter:
    def __init__(self, device: torch.device, budget: int, peak_tflops: float | None, head: AttributeHead | None = None):
        self.device, self.budget, self.peak, self.head = device, budget, peak_tflops, head
        self.stats, self.tokens = Stats.zeros(device), Tokens()
        self.ratings = self._no_ratings()  # (2, A) attribute heads' rating sums (objectives.total), else None
        self.clock = time.perf_counter()

    def _no_ratings(self) -> torch.Tensor | None:
        if self.head is None:
            return None
        return torch.zeros(2, len(self.head.names), dtype=torch.float64, device=self.device)

    def add(self, stats: Stats, batch: PackedBatch, model_flops: float, ratings: torch.Tensor | None = None) -> None:
        """One micro-batch of this rank."""
        self.stats += stats
        if ratings is not None:
            self.ratings += ratings
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
        ratings = [] if self.ratings is None else [self.ratings.flatten()]
        stats, tokens, *ratings = (x.cpu() for x in dist.all_sum_each(self.stats.stack(), local, *ratings))
        elapsed, world = time.perf_counter() - self.clock, dist.world()
        t = Tokens(*tokens.tolist())
        logged = metrics(Stats.unstack(stats), cfg)
        logged.update(
            lr=lr,
            tokens_per_s=t.real / elapsed,
            tokens_per_s_per_gpu=t.real / elapsed / world,
            padding_efficiency=t.real / t.processed,
            budget_fill=t.real / t.budget,
            tflops_per_gpu=t.model_flops / elapsed / world / 1e12,
        )
        if ratings:
            logged.update(train_metrics(ratings[0].reshape(2, -1), self.head))
        if self.peak:
            logged["mfu"] = logged["tflops_per_gpu"] / self.peak
        if self.device.type == "cuda":  # this rank's high-water mark since the start: what a larger run must fit in
            logged["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.stats, self.tokens, self.ratings = Stats.zeros(self.device), Tokens(), self._no_ratings()
        self.clock = time.perf_counter()
        return logged
