"""Tokenised groups as flat arrays on disk, memory-mapped: every rank reads the same pages, none holds a copy.

Indexing a store gives a sequences.Group whose sequences are views of `tokens`, so packing, planning, evaluation
and fingerprints read it as they read any list of groups. A store is a directory of .npy arrays (written by `save`,
opened by `TokenStore.load`):
  tokens         (T,) int32 (uint32 when the vocabulary needs it): every scored sequence end to end
  seq_offsets    (S + 1,) int64: sequence s is tokens[seq_offsets[s]:seq_offsets[s + 1]]
  seq_starts     (S,) int64: the index in sequence s of its first completion token
  group_offsets  (G + 1,) int64: group g is sequences group_offsets[g]..group_offsets[g + 1] - 1
  source_bytes, source_offsets    every group's source ("file:line N") as UTF-8, end to end
  step_offsets   (S + 1,) int64: sequence s's steps are entries step_offsets[s]:step_offsets[s + 1] of step_index
                 and of every per-step column (stepwise)
  step_index     (P,) int64: each step's last token, an index into its sequence
and a column per field of data.labels.Labels (LABELS), holding its `missing` value where a prompt has none, with a
(G,) bool flag column for the fields a prompt may lack (A: the number of data.attributes, 0 without them):
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bigrm.data.examples import Example
from bigrm.data.labels import LABELS, PROMPT, STEP, LabelField, Labels
from bigrm.data.sequences import EncodeReport, Group, Tokenized

LAYOUT = (
    "tokens",
    "seq_offsets",
    "seq_starts",
    "group_offsets",
    "source_bytes",
    "source_offsets",
    "step_offsets",
    "step_index",
)
FLAGS = tuple(dict.fromkeys(f.flag for f in LABELS if f.flag))
STEP_FLAGS = tuple(dict.fromkeys(f.flag for f in LABELS if f.per == STEP))  # a group has steps when one is set
ARRAYS = LAYOUT + tuple(f.column for f in LABELS) + FLAGS


def _listed(f: LabelField) -> str:
    shape = "(S, A)" if f.width else {PROMPT: "(G,)", STEP: "(P,)"}.get(f.per, "(S,)")
    flag = f", flag {f.flag}" if f.flag else ""
    return f"  {f.column:<14} {shape} {np.dtype(f.dtype).name}: Labels.{f.name} per {f.per}{flag}\n"


__doc__ = (__doc__ or "") + "".join(map(_listed, LABELS))


def _offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


class TokenStore(Sequence[Group]):
    def __init__(self, arrays: dict[str, np.ndarray]):
        missing = set(ARRAYS) - set(arrays)
        if missing:
            raise ValueError(f"a token store needs {sorted(missing)}")
        self.a = arrays
        # per label field: its column, and its flag column (None: every group carries it, or none: a 0-wide column)
        self._labels = [(f, arrays[f.column], arrays[f.flag] if f.flag else None) for f in LABELS]

    @staticmethod
    def of(done: Tokenized, examples: list[Example], num_attributes: int = 0) -> TokenStore:
        """The store of encode_examples' result; labels and sources come from the kept examples (each with
        `num_attributes` ratings per completion: the width of every rated field's column)."""
        kept = [examples[i] for i in done.kept]
        ks = [len(e.completions) for e in kept]
        dtype = np.int32 if not len(done.tokens) or done.tokens.max() <= np.iinfo(np.int32).max else np.uint32
        sources = [e.source.encode() for e in kept]
        return TokenStore(
            {
                "tokens": done.tokens.astype(dtype),
                "seq_offsets": _offsets(done.lengths),
                "seq_starts": done.starts.astype(np.int64),
                "group_offsets": _offsets(ks),
                "source_bytes": np.frombuffer(b"".join(sources), dtype=np.uint8),
                "source_offsets": _offsets([len(s) for s in sources]),
                "step_offsets": _offsets(done.step_counts),
                "step_index": done.step_index.astype(np.int64),
                **_label_columns([e.labels for e in kept], ks, num_attributes),
            }
        )

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS:
            np.save(directory / f"{name}.npy", np.ascontiguousarray(self.a[name]))

    @staticmethod
    def load(directory: Path, mmap: bool = True) -> TokenStore:
        """The arrays memory-mapped read-only (or, not `mmap`, read into memory): pages are read on use and shared by
        every process that maps them (plain ndarray views of the maps: slicing an np.memmap costs ~8x more, and a
        group is a handful of slices)."""
        mode = "r" if mmap else None
        return TokenStore({name: np.asarray(np.load(directory / f"{name}.npy", mmap_mode=mode)) for name in ARRAYS})

    def __len__(self) -> int:
        return len(self.a["group_offsets"]) - 1

    def _group(self, g: int) -> Group:
        a = self.a
        lo, hi = int(a["group_offsets"][g]), int(a["group_offsets"][g + 1])
        bounds = a["seq_offsets"][lo : hi + 1].tolist()
        seqs = tuple(a["tokens"][b:e] for b, e in zip(bounds[:-1], bounds[1:], strict=True))
        steps = None  # per sequence, the (first, end) of its steps
        if any(a[flag][g] for flag in STEP_FLAGS):
            cuts = a["step_offsets"][lo : hi + 1].tolist()
            steps = list(zip(cuts[:-1], cuts[1:], strict=True))
        labels = Labels(*(_label(f, column, flag, g, lo, hi, steps) for f, column, flag in self._labels))
        s, e = int(a["source_offsets"][g]), int(a["source_offsets"][g + 1])
        ends = None if steps is None else tuple(a["step_index"][b:e] for b, e in steps)
        starts = tuple(a["seq_starts"][lo:hi].tolist())
        return Group(seqs, bytes(a["source_bytes"][s:e]).decode(), labels, ends, starts)

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


def _label_columns(labels: list[Labels], ks: list[int], width: int) -> dict[str, np.ndarray]:
    """Every label field's column over prompts of ks completions (rated fields `width` wide), and the flags."""
    columns = {}
    for f in LABELS:
        column = np.array([v for lab, k in zip(labels, ks, strict=True) for v in f.values(lab, k, width)], f.dtype)
        columns[f.column] = column.reshape(sum(ks), width) if f.width else column
        if f.flag:
            columns.setdefault(f.flag, np.array([getattr(lab, f.name) is not None for lab in labels], dtype=bool))
    return columns


def _label(f: LabelField, column: np.ndarray, flag: np.ndarray | None, g: int, lo: int, hi: int, steps: list | None):
    """Group g's value of a label field (its sequences are lo..hi - 1, `steps` their steps' (first, end)): None where
    the group has none."""
    if (flag is not None and not flag[g]) or (f.width and not column.shape[1]):
        return None
    if f.per == PROMPT:
        return column[g].item()
    if f.per == STEP:
        return tuple(tuple(column[b:e].tolist()) for b, e in steps)
    values = column[lo:hi].tolist()
    return tuple(map(tuple, values)) if f.width else tuple(values)


def concat(stores: list[TokenStore]) -> TokenStore:
    """The stores' groups one after another."""

    def joined(name: str) -> np.ndarray:
        """An offset array is shifted by the entries it indexes in the stores before (its last offset counts them)."""
        if not name.endswith("offsets"):
            return np.concatenate([s.a[name] for s in stores])
        parts, shift = [np.zeros(1, dtype=np.int64)], 0
        for s in stores:
            parts.append(np.asarray(s.a[name][1:]) + shift)
            shift += int(s.a[name][-1])
        return np.concatenate(parts)

    arrays = {name: joined(name) for name in ARRAYS}
    if arrays["tokens"].dtype != np.uint32 and any(s.a["tokens"].dtype == np.uint32 for s in stores):
        arrays["tokens"] = arrays["tokens"].astype(np.uint32)
    return TokenStore(arrays)


HEADER = 128  # bytes left for each .npy header, written once the array's length is known


def empty_tokenized() -> Tokenized:
    none = np.zeros(0, dtype=np.int64)
    return Tokenized(np.zeros(0, dtype=np.uint32), none, none, none, EncodeReport(), [])


class StoreWriter:
    """A token store written a block of groups at a time, each array appended to its .npy file as it comes (the
    header, which holds the length, written by `close`): the writer's memory is one block's, never the store's;
    what `TokenStore.load` maps is what `save` of all the blocks' `concat` would have written."""

    def __init__(self, directory: Path, num_attributes: int = 0):
        directory.mkdir(parents=True, exist_ok=True)
        self.num_attributes = num_attributes
        empty = TokenStore.of(empty_tokenized(), [], num_attributes).a
        self.files = {name: open(directory / f"{name}.npy", "wb") for name in ARRAYS}
        self.rows = dict.fromkeys(ARRAYS, 0)
        self.shapes = {name: (a.dtype, a.shape[1:]) for name, a in empty.items()}
        self.ends = {name: 0 for name in ARRAYS if name.endswith("offsets")}  # each offset array's last entry
        for name, fh in self.files.items():
            fh.write(bytes(HEADER))
            self._write(name, empty[name])  # the offsets' leading 0

    def append(self, done: Tokenized, examples: list[Example]) -> None:
        """encode_examples' result for `examples`, after the groups already written."""
        for name, a in TokenStore.of(done, examples, self.num_attributes).a.items():
            if name in self.ends:
                a = a[1:] + self.ends[name]
                self.ends[name] = int(a[-1]) if len(a) else self.ends[name]
            if name == "tokens" and a.dtype == np.uint32:  # the same bytes as int32 below 2**31: only the header says
                self.shapes[name] = (a.dtype, ())
            self._write(name, a)

    def _write(self, name: str, a: np.ndarray) -> None:
        self.files[name].write(np.ascontiguousarray(a).tobytes())
        self.rows[name] += len(a)

    def close(self) -> None:
        for name, fh in self.files.items():
            dtype, rest = self.shapes[name]
            header = io.BytesIO()
            shape = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
            np.lib.format.write_array_header_1_0(header, {**shape, "shape": (self.rows[name], *rest)})
            assert len(header.getvalue()) == HEADER, name
            fh.seek(0)
            fh.write(header.getvalue())
            fh.close()
