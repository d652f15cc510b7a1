"""Dynamic batching for `bigrm serve`: requests wait in one queue; a scoring thread takes as many as one token budget
holds, lays completions that share a token prefix (a GRPO group's prompt, whether sent in one request or one request
per completion) out as one group, so their prompt is encoded once, and answers each request with its own part.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from bigrm.inference.rewarder import Encoded, Rewarder, finish

MIN_SHARED = 8  # tokens two completions from different requests must share to be laid out as one group
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class QueueFull(Exception):
    pass


@dataclass
class Job:
    encoded: list[Encoded]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False

    @property
    def sequences(self) -> int:
        return sum(len(e.scored) for e in self.encoded)


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (endpoint, status) → count
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    batches: int = 0
    fill_sum: float = 0.0
    sequences: int = 0
    tokens: int = 0
    forward_seconds: float = 0.0
    cancelled: int = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def text(self, queued: int) -> str:
        """Prometheus' text exposition format."""
        out = ["# TYPE bigrm_requests_total counter"]
        out += [f'bigrm_requests_total{{endpoint="{e}",code="{c}"}} {n}' for (e, c), n in sorted(self.requests.items())]
        out.append("# TYPE bigrm_request_latency_seconds histogram")
        total = 0
        for bound, n in zip((*LATENCY_BUCKETS, "+Inf"), self.latency_buckets, strict=True):
            total += n
            out.append(f'bigrm_request_latency_seconds_bucket{{le="{bound}"}} {total}')
        out += [f"bigrm_request_latency_seconds_sum {self.latency_sum}", f"bigrm_request_latency_seconds_count {total}"]
        rate = self.tokens / self.forward_seconds if self.forward_seconds else 0.0
        for name, kind, value in (
            ("queue_sequences", "gauge", queued),
            ("batches_total", "counter", self.batches),
            ("batch_fill_sum", "counter", self.fill_sum),  # tokens of a batch over the token budget, summed
            ("sequences_scored_total", "counter", self.sequences),
            ("tokens_scored_total", "counter", self.tokens),
            ("forward_seconds_total", "counter", self.forward_seconds),
            ("tokens_per_second", "gauge", rate),  # while scoring
            ("cancelled_requests_total", "counter", self.cancelled),
        ):
            out += [f"# TYPE bigrm_{name} {kind}", f"bigrm_{name} {value}"]
        return "\n".join(out) + "\n"


class Batcher:
    """One scoring thread over a queue of at most `max_queue` sequences; `wait` seconds let a batch fill."""

    def __init__(self, rewarder: Rewarder, max_queue: int = 4096, wait: float = 0.002) -> None:
        self.rewarder, self.max_queue, self.wait = rewarder, max_queue, wait
        self.jobs: deque[Job] = deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.stopping = False
        self.metrics = Metrics()
        self.thread = threading.Thread(target=self._run, name="bigrm-scorer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()

    async def submit(self, encoded: list[Encoded]) -> list[dict]:
        loop = asyncio.get_running_loop()
        job = Job(encoded, loop.create_future(), loop)
        with self.cond:
            if self.queued + job.sequences > self.max_queue:
                raise QueueFull
            self.jobs.append(job)
            self.queued += job.sequences
            self.cond.notify()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancelled = True  # a client gone: its work is dropped if not yet scored
            self.metrics.cancelled += 1
            raise

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.jobs:
                if self.stopping:
                    return None
                self.cond.wait()
        time.sleep(self.wait)  # let requests sent together arrive together
        with self.cond:
            taken, tokens = [], 0
            while self.jobs and (not taken or tokens + _tokens(self.jobs[0]) <= self.rewarder.budget):
                job = self.jobs.popleft()
                self.queued -= job.sequences
                tokens += _tokens(job)
                taken.append(job)
            return taken

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            jobs = [j for j in jobs if not j.cancelled]
            if not jobs:
                continue
            start = time.perf_counter()
            try:
                answers = self._score(jobs)
            except Exception as err:  # a model failure answers its requests (500), never stops the thread
                for job in jobs:
                    job.loop.call_soon_threadsafe(_set, job.future, None, err)
                continue
            m = self.metrics
            m.batches += 1
            m.forward_seconds += time.perf_counter() - start
            m.sequences += sum(j.sequences for j in jobs)
            tokens = sum(_tokens(j) for j in jobs)
            m.tokens += tokens
            m.fill_sum += tokens / self.rewarder.budget
            for job, answer in zip(jobs, answers, strict=True):
                job.loop.call_soon_threadsafe(_set, job.future, answer, None)

    def _score(self, jobs: list[Job]) -> list[list[dict]]:
        """Each job's answers, its queries laid out in groups of completions that share a token prefix."""
        flat = [e for j in jobs for e in j.encoded]
        seqs = [(i, k) for i, e in enumerate(flat) for k in range(len(e.scored))]
        tags = [(flat[i].steps is not None, flat[i].query.per_token) for i, _ in seqs]
        groups = share_groups([flat[i].scored[k].ids for i, k in seqs], tags, self.rewarder.budget)
        merged = [
            Encoded(flat[seqs[g[0]][0]].query, [flat[i].scored[k] for i, k in (seqs[x] for x in g)],
                    None if flat[seqs[g[0]][0]].steps is None else [flat[i].steps[k] for i, k in (seqs[x] for x in g)],
                    {})
            for g in groups
        ]  # fmt: skip
        parts: list[dict] = [{} for _ in seqs]  # per sequence, its one-element share of each answer field
        for g, raw in zip(groups, self.rewarder.score_scored(merged), strict=True):
            for pos, x in enumerate(g):
                parts[x] = _pick(raw, pos)
        at, answers = iter(parts), []
        for e in flat:
            mine = [next(at) for _ in e.scored]
            answers.append(finish(_join(mine), e.skipped))
        it = iter(answers)
        return [[next(it) for _ in j.encoded] for j in jobs]


def share_groups(seqs: list[list[int]], tags: list[tuple], budget: int) -> list[list[int]]:
    """Sequence indices in groups: sorted by (tag, tokens), neighbours with the same tag (stepwise, per token) that
    share at least MIN_SHARED leading tokens join one group, within the token budget."""
    order = sorted(range(len(seqs)), key=lambda i: (tags[i], seqs[i]))
    groups: list[list[int]] = []
    tokens = 0
    for i in order:
        if groups:
            head = seqs[groups[-1][0]]
            n = min(len(head), len(seqs[i]), MIN_SHARED)
            same = tags[groups[-1][0]] == tags[i] and np.array_equal(head[:n], seqs[i][:n])
            if n == MIN_SHARED and same and tokens + len(seqs[i]) <= budget:
                groups[-1].append(i)
                tokens += len(seqs[i])
                continue
        groups.append([i])
        tokens = len(seqs[i])
    return groups


def _pick(raw: dict, pos: int) -> dict:
    return {k: ({n: v[pos] for n, v in x.items()} if isinstance(x, dict) else x[pos]) for k, x in raw.items()}


def _join(parts: list[dict]) -> dict:
    if not parts:
        return {"rewards": [], "values": [], "cut": []}
    return {
        k: ({n: [p[k][n] for p in parts] for n in x} if isinstance(x, dict) else [p[k] for p in parts])
        for k, x in parts[0].items()
    }


def _tokens(job: Job) -> int:
    return sum(e.tokens for e in job.encoded)


def _set(future: asyncio.Future, value, err: Exception | None) -> None:
    if future.done():
        return
    if err is None:
        future.set_result(value)
    else:
        future.set_exception(err)
