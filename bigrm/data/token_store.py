"""Tokenised groups as flat arrays on disk, memory-mapped: every rank reads the same pages, none holds a copy.

A store is a directory of .npy arrays (written by `save`, opened by `TokenStore.load`):
  tokens         (T,) int32 (uint32 when the vocabulary needs it): every scored sequence end to end
  seq_offsets    (S + 1,) int64: sequence s is tokens[seq_offsets[s]:seq_offsets[s + 1]]
  group_offsets  (G + 1,) int64: group g is sequences group_offsets[g]..group_offsets[g + 1] - 1
  ranks, scores, targets          (S,) per sequence: data.Labels' fields (NaN where a group has none)
  has_scores, has_targets         (G,) bool
  margin, weight                  (G,) float64
  attributes                      (S, A) float64: data.Labels.attributes, NaN where missing (A = 0 without them)
  source_bytes, source_offsets    every group's source ("file:line N") as UTF-8, end to end
  step_offsets   (S + 1,) int64: sequence s's steps are step_index[step_offsets[s]:step_offsets[s + 1]] (stepwise)
  step_index     (P,) int64: each step's last token, an index into its sequence
  step_labels    (P,) float64: each step's label in [0, 1]
  step_weights   (S,) float64: the row weight of each stepwise sequence (NaN for others)
  has_steps      (G,) bool
Indexing a store gives a sequences.Group whose sequences are views of `tokens`, so packing, planning, evaluation
and fingerprints read it as they read any list of groups.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bigrm.data.examples import Example
from bigrm.data.labels import Labels
from bigrm.data.sequences import Group, Tokenized

ARRAYS = (
    "tokens",
    "seq_offsets",
    "group_offsets",
    "ranks",
    "scores",
    "targets",
    "has_scores",
    "has_targets",
    "margin",
    "weight",
    "source_bytes",
    "source_offsets",
    "attributes",
    "step_offsets",
    "step_index",
    "step_labels",
    "step_weights",
    "has_steps",
)


def _offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


class TokenStore(Sequence[Group]):
    def __init__(self, arrays: dict[str, np.ndarray]):
        missing = set(ARRAYS) - set(arrays)
        if missing:
            raise ValueError(f"a token store needs {sorted(missing)}")
        self.a = arrays

    @staticmethod
    def of(done: Tokenized, examples: list[Example], num_attributes: int = 0) -> TokenStore:
        """The store of encode_examples' result; labels and sources come from the kept examples (each with
        `num_attributes` ratings per completion)."""
        kept = [examples[i] for i in done.kept]
        ks = [len(e.completions) for e in kept]
        dtype = np.int32 if not len(done.tokens) or done.tokens.max() <= np.iinfo(np.int32).max else np.uint32

        def per_seq(values, default) -> np.ndarray:
            return np.array([v for e, k in zip(kept, ks, strict=True) for v in (values(e) or default(k))], np.float64)

        sources = [e.source.encode() for e in kept]
        return TokenStore(
            {
                "tokens": done.tokens.astype(dtype),
                "seq_offsets": _offsets(done.lengths),
                "group_offsets": _offsets(ks),
                "ranks": per_seq(lambda e: e.labels.ranks, range).astype(np.int64),
                "scores": per_seq(lambda e: e.labels.scores, lambda k: [np.nan] * k),
                "targets": per_seq(lambda e: e.labels.targets, lambda k: [np.nan] * k),
                "has_scores": np.array([e.labels.scores is not None for e in kept], dtype=bool),
                "has_targets": np.array([e.labels.targets is not None for e in kept], dtype=bool),
                "margin": np.array([e.labels.margin for e in kept], dtype=np.float64),
                "weight": np.array([e.labels.weight for e in kept], dtype=np.float64),
                "source_bytes": np.frombuffer(b"".join(sources), dtype=np.uint8),
                "source_offsets": _offsets([len(s) for s in sources]),
                "attributes": np.array(
                    [r for e in kept for r in (e.labels.attributes or ())], dtype=np.float64
                ).reshape(len(done.lengths), num_attributes),
                "step_offsets": _offsets(done.step_counts),
                "step_index": done.step_index.astype(np.int64),
                "step_labels": np.array([v for e in kept for s in e.labels.steps or () for v in s], np.float64),
                "step_weights": per_seq(lambda e: e.labels.step_weights, lambda k: [np.nan] * k),
                "has_steps": np.array([e.labels.steps is not None for e in kept], dtype=bool),
            }
        )

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS:
            np.save(directory / f"{name}.npy", np.ascontiguousarray(self.a[name]))

    @staticmethod
    def load(directory: Path) -> TokenStore:
        """The arrays memory-mapped read-only: pages are read on use and shared by every process that maps them (plain
        ndarray views of the maps: slicing an np.memmap costs ~8x more, and a group is a handful of slices)."""
        return TokenStore({name: np.asarray(np.load(directory / f"{name}.npy", mmap_mode="r")) for name in ARRAYS})

    def __len__(self) -> int:
        return len(self.a["group_offsets"]) - 1

    def _group(self, g: int) -> Group:
        a = self.a
        lo, hi = int(a["group_offsets"][g]), int(a["group_offsets"][g + 1])
        bounds = a["seq_offsets"][lo : hi + 1].tolist()
        seqs = tuple(a["tokens"][b:e] for b, e in zip(bounds[:-1], bounds[1:], strict=True))
        steps = labels_of_steps = weights = None
        if a["has_steps"][g]:
            cuts = a["step_offsets"][lo : hi + 1].tolist()
            pieces = list(zip(cuts[:-1], cuts[1:], strict=True))
            steps = tuple(a["step_index"][b:e] for b, e in pieces)
            labels_of_steps = tuple(tuple(a["step_labels"][b:e].tolist()) for b, e in pieces)
            weights = tuple(a["step_weights"][lo:hi].tolist())
        labels = Labels(
            ranks=tuple(a["ranks"][lo:hi].tolist()),
            scores=tuple(a["scores"][lo:hi].tolist()) if a["has_scores"][g] else None,
            targets=tuple(a["targets"][lo:hi].tolist()) if a["has_targets"][g] else None,
            margin=float(a["margin"][g]),
            weight=float(a["weight"][g]),
            attributes=tuple(map(tuple, a["attributes"][lo:hi].tolist())) if a["attributes"].shape[1] else None,
            steps=labels_of_steps,
            step_weights=weights,
        )
        s, e = int(a["source_offsets"][g]), int(a["source_offsets"][g + 1])
        return Group(seqs, bytes(a["source_bytes"][s:e]).decode(), labels, steps)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._group(g) for g in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._group(index)

    def __iter__(self) -> Iterator[Group]:
        return (self._group(g) for g in range(len(self)))

    @property
    def num_tokens(self) -> int:
        return len(self.a["tokens"])


def concat(stores: list[TokenStore]) -> TokenStore:
    """The stores' groups one after another."""

    def joined(name: str, counts: str | None = None) -> np.ndarray:
        """Offset arrays are shifted by what precedes them (`counts`: the array they index)."""
        if counts is None:
            return np.concatenate([s.a[name] for s in stores])
        parts, shift = [np.zeros(1, dtype=np.int64)], 0
        for s in stores:
            parts.append(np.asarray(s.a[name][1:]) + shift)
            shift += len(s.a[counts])
        return np.concatenate(parts)

    arrays = {name: joined(name) for name in ARRAYS if not name.endswith("offsets")}
    arrays["seq_offsets"] = joined("seq_offsets", "tokens")
    arrays["group_offsets"] = joined("group_offsets", "ranks")
    arrays["source_offsets"] = joined("source_offsets", "source_bytes")
    arrays["step_offsets"] = joined("step_offsets", "step_index")
    if arrays["tokens"].dtype != np.uint32 and any(s.a["tokens"].dtype == np.uint32 for s in stores):
        arrays["tokens"] = arrays["tokens"].astype(np.uint32)
    return TokenStore(arrays)
