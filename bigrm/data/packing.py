"""Scored token sequences → packed micro-batches.

A micro-batch is one flat row: the K sequences of each of its prompts laid end to end, with `cu_seqlens`,
per-segment `position_ids`, a segment→group index and each segment's rank (0 = best). All K completions of a
prompt share a micro-batch. Pure functions of (group sizes, seed, epoch): every rank computes the same plan, so
every rank runs the same number of micro-batches per optimizer step (ZeRO-3 would hang otherwise).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, fields, make_dataclass

import numpy as np
import torch

from bigrm.data.labels import LABELS, PROMPT, STEP, LabelField, Labels, step_counts
from bigrm.data.sequences import Group
from bigrm.errors import DataError


@dataclass
class Update:
    """One optimizer update (what options and logs call an optimizer step; in the code "step" alone is a PRM
    reasoning step): micro_batches[rank][i] is a list of group indices (possibly empty)."""

    micro_batches: list[list[list[int]]]
    num_groups: int  # over all ranks: the loss is the mean of per-prompt losses over these
    epoch: int
    index: int  # within the epoch


def first_fit_decreasing(items: list[int], sizes: list[int], budget: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(items, key=lambda i: -sizes[i]):
        for b, free in enumerate(room):
            if sizes[i] <= free:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(budget - sizes[i])
    return bins


def pack_bins(order: list[int], sizes: list[int], budget: int, window: int) -> list[list[int]]:
    """First-fit decreasing inside consecutive windows of an already shuffled order."""
    too_big = [i for i in order if sizes[i] > budget]
    if too_big:
        raise ValueError(f"{len(too_big)} prompt(s) exceed max_tokens_per_batch={budget}, e.g. index {too_big[0]}")
    bins: list[list[int]] = []
    for lo in range(0, len(order), window):
        bins += first_fit_decreasing(order[lo : lo + window], sizes, budget)
    return bins


def _fill_last_update(bins: list[list[int]], sizes: list[int], per_update: int) -> list[list[int]]:
    """Split the fullest multi-group bins until the final update has one bin per slot; leave the rest empty."""
    bins = [list(b) for b in bins]
    while len(bins) < per_update:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            bins += [[] for _ in range(per_update - len(bins))]
            break
        big = max(splittable, key=lambda b: sum(sizes[i] for i in b))
        bins.remove(big)
        by_size = sorted(big, key=lambda i: -sizes[i])
        bins += [by_size[0::2], by_size[1::2]]
    return bins


def _assign(bins: list[list[int]], sizes: list[int], world: int, accum: int) -> list[list[list[int]]]:
    """Largest bin first to the rank with the fewest tokens that still has a free slot."""
    ranks: list[list[list[int]]] = [[] for _ in range(world)]
    load = [0] * world
    for b in sorted(bins, key=lambda b: -sum(sizes[i] for i in b)):
        r = min((r for r in range(world) if len(ranks[r]) < accum), key=lambda r: load[r])
        ranks[r].append(b)
        load[r] += sum(sizes[i] for i in b)
    return ranks


def plan_epoch(
    items: list[int], sizes: list[int], *, budget: int, world: int, accum: int, window: int, seed: int, epoch: int
) -> list[Update]:
    """Shuffle `items` (group indices, repeats allowed), pack, and cut into optimizer updates."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(items)
    rng.shuffle(order)
    bins = pack_bins(order, sizes, budget, window)
    rng.shuffle(bins)
    per_update = world * accum
    updates = []
    for lo in range(0, len(bins), per_update):
        chunk = bins[lo : lo + per_update]
        if len(chunk) < per_update:
            chunk = _fill_last_update(chunk, sizes, per_update)
        updates.append(Update(_assign(chunk, sizes, world, accum), sum(len(b) for b in chunk), epoch, len(updates)))
    return updates


def prompt_id(source: str) -> int:
    """A prompt's id from its Group.source (file and line), the same in every process: its CRC-32."""
    return zlib.crc32(source.encode())


class LabelTensors:
    """What SegmentLabels does; its fields are made from the label specification (data.labels.LABELS) below."""

    @staticmethod
    def of(
        labels: list[Labels],
        ks: list[int],
        dtype: torch.dtype = torch.float32,
        lengths: list[int] | None = None,
        sources: list[str] | None = None,
    ) -> SegmentLabels:
        """Prompt g has ks[g] completions; `dtype` is that of every float label (scores, targets, margins, ...);
        `lengths`: each completion's length in tokens (seg_length); `sources`: each prompt's Group.source (group_id)."""
        prompts = list(zip(labels, ks, strict=True))
        return SegmentLabels(
            seg_group=torch.repeat_interleave(torch.arange(len(ks)), torch.tensor(ks, dtype=torch.long)),
            num_groups=len(labels),
            **{f.tensor: _tensor(f, prompts, dtype) for f in LABELS},
            **_step_layout(prompts),
            seg_length=None if lengths is None else torch.tensor(lengths, dtype=torch.long),
            group_id=None if sources is None else torch.tensor([prompt_id(s) for s in sources], dtype=torch.long),
        )

    @property
    def num_steps(self) -> int:
        return 0 if self.step_seg is None else len(self.step_seg)

    def to(self, device: torch.device | str) -> SegmentLabels:
        return SegmentLabels(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})


def _optional(f: LabelField) -> bool:
    """Whether the field's tensor is None in batches without it: per-step ones (no steps) and rated ones (no width)."""
    return STEP in (f.per, f.laid) or f.width


def _tensor(f: LabelField, prompts: list[tuple[Labels, int]], dtype: torch.dtype) -> torch.Tensor | None:
    """A label field's values, laid out per scored segment, per prompt, or per step, in that order."""
    width = 0
    if f.width:  # rated: as wide as the first prompt's ratings; None when no prompt has any
        width = next((len(v[0]) for lab, _ in prompts if (v := getattr(lab, f.name))), None)
        if width is None:
            return None
    values = []
    for lab, k in prompts:
        got = f.values(lab, k, width)
        if f.laid == STEP:  # one value per completion, repeated over its steps
            got = [v for v, n in zip(got, step_counts(lab, k), strict=True) for _ in range(n)]
        if f.times:
            got = [v * getattr(lab, f.times) for v in got]
        values += got
    if STEP in (f.per, f.laid) and not values:  # no prompt is stepwise
        return None
    kind = {"i": torch.long, "b": torch.bool}.get(np.dtype(f.dtype).kind, dtype)
    tensor = torch.tensor(values, dtype=kind)
    return tensor.reshape(len(values), width) if f.width else tensor


def _step_layout(prompts: list[tuple[Labels, int]]) -> dict[str, torch.Tensor]:
    """step_seg and step_last: none when no prompt is stepwise."""
    seg, last, n = [], [], 0
    for lab, k in prompts:
        for count in step_counts(lab, k):
            seg += [n] * count
            last += [i == count - 1 for i in range(count)]
            n += 1
    if not seg:
        return {}
    return {"step_seg": torch.tensor(seg, dtype=torch.long), "step_last": torch.tensor(last, dtype=torch.bool)}


def _shape(f: LabelField) -> str:
    return "(P,)" if _optional(f) and not f.width else "(N, A)" if f.width else "(G,)" if f.per == PROMPT else "(N,)"


SegmentLabels = make_dataclass(
    "SegmentLabels",
    [
        ("seg_group", torch.Tensor),  # (N,) prompt of each scored segment, 0..G-1, segments grouped in prompt order
        *((f.tensor, torch.Tensor) for f in LABELS if not _optional(f)),
        ("num_groups", int),
        *((f.tensor, torch.Tensor | None, None) for f in LABELS if _optional(f)),
        # stepwise segments: every step of the batch, segments in order, steps in order within a segment
        ("step_seg", torch.Tensor | None, None),  # (P,) scored segment of each step, 0..N-1
        ("step_last", torch.Tensor | None, None),  # (P,) the step is its solution's last
        # (N,) completion length in tokens: the tokens after its prompt's completions' common prefix (collate)
        ("seg_length", torch.Tensor | None, None),
        # (G,) int64 CRC-32 of each prompt's source (file and line): what fixes its bootstrap weights (kinds.ensemble)
        ("group_id", torch.Tensor | None, None),
    ],
    bases=(LabelTensors,),
    namespace={
        "__module__": __name__,
        "__doc__": "The labels (data.labels.Labels) of a set of prompts laid out for the loss, N scored segments of G "
        "prompts with P steps (None: a batch without them): seg_group, num_groups, step_seg, step_last, seg_length, "
        "group_id and "
        "one tensor per label field: "
        + ", ".join(f"{f.tensor} {_shape(f)} Labels.{f.name}" + (f" × {f.times}" if f.times else "") for f in LABELS),
    },
)


def _to(value, device: torch.device | str):
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (1, T) all segments end to end
    position_ids: torch.Tensor  # (1, T) restarting at 0 in every segment (a shared suffix continues its prefix)
    cu_seqlens: torch.Tensor  # (S + 1,) int32 segment boundaries: shared prefixes, sequences, alignment padding
    seg_parent: torch.Tensor  # (S,) the shared-prefix segment a segment continues, -1 for none
    last_index: torch.Tensor  # (N,) position of each scored segment's final token
    labels: SegmentLabels
    max_seqlen: int
    real_tokens: int
    # varlen kernels with shared prefixes: each segment's keys are its prefix's tokens then its own
    kv_index: torch.Tensor | None = None  # (T_k,) token positions gathered into the key/value stream
    cu_seqlens_k: torch.Tensor | None = None  # (S + 1,) int32 boundaries of the key sequences
    max_seqlen_k: int = 0
    step_index: torch.Tensor | None = None  # (P,) position of each step's last token (labels.step_seg: its segment)

    @property
    def read_index(self) -> torch.Tensor:
        """(N + P,) where the model reads the value head: each scored segment's final token, then each step end."""
        return self.last_index if self.step_index is None else torch.cat([self.last_index, self.step_index])

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {f.name: _to(getattr(self, f.name), device) for f in fields(self)}
        return PackedBatch(**{**moved, "labels": self.labels.to(device)})

    @property
    def processed_tokens(self) -> int:
        return self.input_ids.shape[1]


def shared_prefix(seqs: tuple[np.ndarray, ...]) -> int:
    """Length of the longest common token prefix, leaving every sequence at least its final (scored) token."""
    shortest = min(len(s) for s in seqs)
    heads = np.stack([s[: shortest - 1] for s in seqs])  # (K, shortest - 1)
    same = (heads == heads[0]).all(0)
    return int(same.argmin()) if not same.all() else shortest - 1


def layout_tokens(group: Group, share_prompt: bool) -> int:
    """Tokens the group occupies in a packed row: its shared prefix counts once."""
    if not share_prompt:
        return group.num_tokens
    return group.num_tokens - (len(group.seqs) - 1) * shared_prefix(group.seqs)


def completion_lengths(groups: list[Group]) -> list[int] | None:
    """Per scored sequence its completion's length in tokens, from its first completion token (what remains of the
    prompt after a cut from the left is not the completion's); None when some group does not know its starts."""
    if any(g.starts is None for g in groups):
        return None
    return [len(s) - start for g in groups for s, start in zip(g.seqs, g.starts, strict=True)]


def check_budget(groups: list[Group], budget: int, share_prompt: bool, what: str = "", option: str = "--") -> None:
    """All K completions of a prompt share one micro-batch: a DataError when some prompt's cannot fit the budget
    (`option` prefixes the budget's name in the message: "train." in training, "--" on the command line)."""
    big = [g for g in groups if layout_tokens(g, share_prompt) > budget]
    # training can spread one micro-batch over several ranks' memory
    spread = " (train.sequence_parallel: N splits each micro-batch over N ranks)" if option == "train." else ""
    if big:
        raise DataError(
            f"{len(big)} {what}prompt(s) need more than {option}max_tokens_per_batch={budget} tokens for their K "
            f"completions, e.g. {big[0].source} ({big[0].num_tokens} tokens); raise the budget{spread} or lower "
            "data.max_length"
        )


def collate(groups: list[Group], pad_id: int, pad_to_multiple: int = 1, share_prompt: bool = False) -> PackedBatch:
    """Lay groups end to end; with share_prompt each group's common token prefix is laid out once, followed by the
    K suffixes, which attend to it and to themselves. An empty list gives a 1-token placeholder that carries no
    loss (keeps ranks in step)."""
    segs: list[tuple[np.ndarray, int, int, bool]] = []  # (tokens, first position, parent segment, scored)
    step_at: list[tuple[int, int, np.ndarray]] = []  # stepwise: (segment, its parent, step end indices - prefix)
    for g in groups:
        p = shared_prefix(g.seqs) if share_prompt else 0
        parent = -1
        if p:
            parent = len(segs)
            segs.append((g.seqs[0][:p], 0, -1, False))
        if g.steps is not None:
            step_at += [(len(segs) + j, parent, np.asarray(ends, dtype=np.int64) - p) for j, ends in enumerate(g.steps)]
        segs += [(s[p:], p, parent, True) for s in g.seqs]
    real = sum(len(t) for t, *_ in segs)
    total = -(-max(real, 1) // pad_to_multiple) * pad_to_multiple
    if total > real:  # alignment padding forms its own segment, so no real token attends to it
        segs.append((np.full(total - real, pad_id, dtype=np.int64), 0, -1, False))
    lens = np.array([len(t) for t, *_ in segs], dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lens)])
    starts = np.array([first for _, first, _, _ in segs], dtype=np.int64)
    positions = np.arange(total) - np.repeat(cu[:-1] - starts, lens)
    parents = np.array([parent for _, _, parent, _ in segs], dtype=np.int64)
    scored = np.array([flag for *_, flag in segs], dtype=bool)
    k_per_group = [len(g.seqs) for g in groups]
    batch = PackedBatch(
        input_ids=torch.from_numpy(np.concatenate([t for t, *_ in segs]).astype(np.int64, copy=False))[None],
        position_ids=torch.from_numpy(positions)[None],
        cu_seqlens=torch.from_numpy(cu).to(torch.int32),
        seg_parent=torch.from_numpy(parents),
        last_index=torch.from_numpy(cu[1:][scored] - 1),
        labels=SegmentLabels.of(
            [g.labels for g in groups],
            k_per_group,
            lengths=completion_lengths(groups),
            sources=[g.source for g in groups],
        ),
        max_seqlen=int(lens.max()),
        real_tokens=real,
    )
    if step_at:
        # a step that ends inside the shared prefix (solutions that begin alike) is read there: same tokens, same value
        batch.step_index = torch.from_numpy(
            np.concatenate([np.where(e >= 0, cu[s] + e, cu[max(q, 0)] + e + starts[s]) for s, q, e in step_at])
        )
    if (parents >= 0).any():
        keys = [np.arange(cu[s], cu[s + 1]) for s in range(len(segs))]
        keys = [np.concatenate([keys[p], k]) if p >= 0 else k for k, p in zip(keys, parents, strict=True)]
        klens = np.array([len(k) for k in keys], dtype=np.int64)
        batch.kv_index = torch.from_numpy(np.concatenate(keys))
        batch.cu_seqlens_k = torch.from_numpy(np.concatenate([[0], np.cumsum(klens)])).to(torch.int32)
        batch.max_seqlen_k = int(klens.max())
    return batch
