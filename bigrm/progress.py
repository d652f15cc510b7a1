"""Progress of a long phase (reading and tokenising data, loading a model, training, exporting, scoring), rank 0 only.

On a terminal a tqdm bar; in a batch log (stderr not a terminal) a plain line every INTERVAL seconds instead, since
a redrawn bar there is one ever-growing line of carriage returns. Every phase gets its progress from here.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

from bigrm import dist

INTERVAL = 30.0  # seconds between two lines in a batch log


class Lines:
    """tqdm's update / set_postfix / write / close, printing `desc: n/total unit (p%), rate, elapsed` lines."""

    def __init__(self, total: int | None, desc: str, unit: str, enabled: bool):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n, self.postfix = 0, ""
        self.start = self.last = time.monotonic()
        self.lines = 0  # progress lines printed so far

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self.last >= INTERVAL:
            self.last = now
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.enabled and self.lines:  # a phase long enough to have reported says when it ended
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self.start
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / elapsed:.3g} {self.unit}/s" if elapsed > 0 else ""
        post = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}{share}{rate}, {elapsed:.0f} s{post}", file=sys.stderr, flush=True)
        self.lines += 1


def bar(total: int | None, desc: str, unit: str = "it") -> tqdm | Lines:
    """A progress counter for `total` units (None: unknown), shown by rank 0 only."""
    main = dist.is_main()
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not main, mininterval=0.1)
    return Lines(total, desc, unit, enabled=main)


class Stages:
    """A phase made of named steps: `advance()` marks the current one done; the counter names the next."""

    def __init__(self, desc: str, names: tuple[str, ...]):
        self.names, self.done = names, 0
        self.counter = bar(len(names), desc, unit="stage")
        self.counter.set_postfix(stage=names[0])

    def advance(self) -> None:
        self.done += 1
        if self.done < len(self.names):
            self.counter.set_postfix(stage=self.names[self.done])
        self.counter.update(1)
        if self.done == len(self.names):
            self.counter.close()


def each(items: Iterable, desc: str, unit: str = "it", total: int | None = None) -> Iterator:
    """The items, counted as they are consumed."""
    counter = bar(total if total is not None else _length(items), desc, unit)
    try:
        for item in items:
            yield item
            counter.update(1)
    finally:
        counter.close()


def _length(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


@contextlib.contextmanager
def transformers_bars() -> Iterator[None]:
    """Inside, the progress transformers reports (loading weights, writing shards) goes through `each`."""
    from transformers.utils import logging as hf_logging

    def hook(_factory, args: tuple, kwargs: dict) -> Iterable:
        items = args[0] if args else kwargs.get("iterable", ())
        return each(items, kwargs.get("desc", "transformers"), total=kwargs.get("total"))

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)
