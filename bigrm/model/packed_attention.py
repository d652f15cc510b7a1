"""Packed attention: the kernels bigrm registers with transformers and the masks that keep segments apart.

With share_prompt a group's common prefix is laid out once: its suffixes see it through the mask, or, for the varlen
kernels, through keys gathered per suffix (prefix + suffix) with separate query/key boundaries. Which backend runs,
and what each layer asks of it (AttentionNeeds), is bigrm.model.attention's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bigrm.data.packing import PackedBatch
from bigrm.model import attention
from bigrm.model.attention import HF_ATTN, VARLEN_IMPLS, AttentionNeeds


def _layer_window(module: nn.Module, kw: dict) -> int | None:
    """This layer's window, from the per-layer table read from the config; the model's own sliding_window argument,
    where it passes one, must agree with it (else our reading of its config is wrong: refuse, never guess)."""
    windows = kw["bigrm_windows"]
    window = windows[0] if len(set(windows)) == 1 else windows[module.layer_idx]
    given = kw.get("sliding_window")
    if given is not None and given != window:
        raise RuntimeError(f"{type(module).__name__}: the model asks for a {given}-token window, bigrm read {window}")
    return window


def _refuse_unsupported(kw: dict, backend: str, softcap: bool = False) -> None:
    """What check_backend lets no config bring here: reaching it means a model computes attention bigrm cannot."""
    if not softcap and kw.get("softcap") is not None:
        raise RuntimeError(f"{backend} cannot soft-cap attention logits (check_backend should have refused)")
    if kw.get("s_aux") is not None:
        raise RuntimeError(f"{backend}: attention sinks are not supported by bigrm's packed attention")


def _varlen_inputs(query, key, value, kw):
    """(T, H, D) queries, keys and values, and the boundaries. With shared prefixes the keys of a suffix are its
    prefix's tokens followed by its own, gathered here, so one varlen call with separate query/key boundaries covers
    every branch (the kernels align causality bottom-right: a suffix query sees the whole prefix and its own past;
    a prefix and its suffix are consecutive positions, so a window over the gathered keys is a window in positions)."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (1, H, T, D) → (T, H, D)
    if kw.get("bigrm_kv_index") is not None:
        k, v = k[kw["bigrm_kv_index"]], v[kw["bigrm_kv_index"]]
    return q, k, v, kw["cu_seq_lens_q"], kw["cu_seq_lens_k"], kw["max_length_q"], kw["max_length_k"]


def _torch_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    from torch.nn.attention import varlen

    _refuse_unsupported(kw, "varlen")
    window = _layer_window(module, kw)
    q, k, v, cu_q, cu_k, max_q, max_k = _varlen_inputs(query, key, value, kw)
    # read through the module, not imported: VARLEN_PARAMS has one home, which the tests' kernel stand-ins patch
    gqa = "enable_gqa" in attention.VARLEN_PARAMS
    if q.shape[1] != k.shape[1] and not gqa:  # torch 2.10 has no grouped-query option
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    extra = {"enable_gqa": q.shape[1] != k.shape[1]} if gqa else {}
    # torch 2.10 spells causality is_causal; later versions a (left, right) window, (-1, 0) being causal and
    # (w - 1, 0) a query with the w - 1 keys before it (transformers' window: kv > q - w)
    if "window_size" in attention.VARLEN_PARAMS:
        extra["window_size"] = (-1, 0) if window is None else (window - 1, 0)
    elif window is None:
        extra["is_causal"] = True
    else:
        raise RuntimeError("this torch's varlen_attn has no window_size (check_backend should have refused)")
    out = varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **extra)
    return out[None], None


def _flash_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    from flash_attn import flash_attn_varlen_func

    _refuse_unsupported(kw, "flash_attn", softcap=True)
    window = _layer_window(module, kw)
    q, k, v, cu_q, cu_k, max_q, max_k = _varlen_inputs(query, key, value, kw)
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
        window_size=(-1, -1) if window is None else (window - 1, 0),
        softcap=kw.get("softcap") or 0.0,  # flash-attn's "none"
    )
    return out[None], None


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process: uncompiled it is a dense reference implementation. Dynamic shapes,
    since every packed micro-batch has its own length."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _softcap_score(softcap: float):
    def score_mod(score, b, h, q, kv):
        return softcap * torch.tanh(score / softcap)

    return score_mod


def _flex(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    from torch.nn.attention.flex_attention import flex_attention

    # inside a compiled block dynamo traces flex_attention itself. On CPU (forward only) the uncompiled reference
    # runs: inductor's CPU flex template fails to build with dynamic shapes.
    eager = torch.compiler.is_compiling() or not query.is_cuda
    fn = flex_attention if eager else _compiled_flex()
    _refuse_unsupported(kw, "flex", softcap=True)
    softcap = kw.get("softcap")
    out = fn(
        query,
        key,
        value,
        score_mod=_softcap_score(softcap) if softcap else None,
        block_mask=attention_mask,  # this layer's: its window is in the mask
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None  # (1, H, T, D) → (1, T, H, D), as HF's attention functions return


@dataclass
class RowBucket:
    """Segments of one length class as the rows of a padded batch."""

    q_index: torch.Tensor  # (n, Lq) token position of each query slot (0 in padding)
    k_index: torch.Tensor  # (n, Lk) token position of each key slot (a suffix's keys: its prefix, then itself)
    # per window (None: none) (n, 1, Lq, Lk): causal, aligned bottom-right, the keys within the window; padded query
    # slots see every real key (a fully masked row would give NaN)
    allowed: dict[int | None, torch.Tensor]
    slots: torch.Tensor  # (real queries,) the real slots of the flattened (n * Lq) rows, in token order


@dataclass
class SegmentRows:
    """Every segment as one row of a padded batch, rows bucketed by power-of-two query length (so a row is padded
    to at most twice its length, and a long shared prefix does not pad its short suffixes): SDPA then costs
    sum(n * Lq * Lk) over buckets, not T^2 as under the packed row's mask."""

    buckets: list[RowBucket]
    order: torch.Tensor  # (T,) each token's place among the buckets' concatenated outputs

    @staticmethod
    def of(batch: PackedBatch, windows: tuple[int | None, ...] = (None,)) -> SegmentRows:
        shared = batch.kv_index is not None
        cu_q = batch.cu_seqlens.long()
        cu_k = batch.cu_seqlens_k.long() if shared else cu_q
        len_q, len_k = cu_q.diff(), cu_k.diff()
        length_class = torch.ceil(torch.log2(len_q.clamp(min=1).double())).long()
        buckets, positions = [], []
        for c in length_class.unique().tolist():
            segs = (length_class == c).nonzero()[:, 0]
            lq, lk = len_q[segs], len_k[segs]
            iq = torch.arange(int(lq.max()), device=cu_q.device)
            ik = torch.arange(int(lk.max()), device=cu_q.device)
            q_valid, k_valid = iq < lq[:, None], ik < lk[:, None]
            q_index = torch.where(q_valid, cu_q[segs, None] + iq, 0)
            k_slot = torch.where(k_valid, cu_k[segs, None] + ik, 0)
            # a key slot's index in its row is its position; a query's position is its slot + (Lk - Lq)
            distance = (iq[None, :, None] + (lk - lq)[:, None, None]) - ik[None, None, :]  # (n, Lq, Lk)
            causal = k_valid[:, None, :] & (distance >= 0)
            allowed = {
                w: (causal if w is None else causal & ((distance < w) | ~q_valid[:, :, None]))[:, None]
                for w in dict.fromkeys(windows)
            }
            slots = q_valid.flatten().nonzero()[:, 0]
            k_index = batch.kv_index[k_slot] if shared else k_slot
            buckets.append(RowBucket(q_index, k_index, allowed, slots))
            positions.append(q_index.flatten()[slots])
        order = torch.empty(batch.processed_tokens, dtype=torch.long, device=cu_q.device)
        order[torch.cat(positions)] = torch.arange(batch.processed_tokens, device=cu_q.device)
        return SegmentRows(buckets, order)

    def cheaper_than_dense(self, total: int) -> bool:
        return sum(b.q_index.numel() * b.k_index.shape[1] for b in self.buckets) < total**2


@torch.compiler.disable  # the bucket count varies per micro-batch: compiled, each count would be a recompilation
def _segment_attention(query, key, value, rows: SegmentRows, window: int | None, scaling, dropout):
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (1, H, T, D) → (T, H, D)
    outs = []
    for b in rows.buckets:  # (n, L, H, D) → (n, H, L, D)
        bq, bk, bv = q[b.q_index].transpose(1, 2), k[b.k_index].transpose(1, 2), v[b.k_index].transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(
            bq,
            bk,
            bv,
            attn_mask=b.allowed[window],
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=bq.shape[1] != bk.shape[1],
        )  # (n, H, Lq, D)
        outs.append(out.transpose(1, 2).flatten(0, 1)[b.slots])
    return torch.cat(outs)[rows.order][None]  # (1, T, H, D)


def _sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    _refuse_unsupported(kw, "sdpa")
    rows = kw.pop("bigrm_rows", None)
    if rows is None:  # the dense block-diagonal mask (this layer's window in it) was cheaper for this micro-batch
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
    return _segment_attention(query, key, value, rows, _layer_window(module, kw), scaling, dropout), None


AttentionInterface.register(HF_ATTN["sdpa"], _sdpa)
AttentionInterface.register(HF_ATTN["varlen"], _torch_varlen)
AttentionInterface.register(HF_ATTN["flash_attn"], _flash_varlen)
AttentionInterface.register(HF_ATTN["flex"], _flex)


def _segments(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(T,) the segment of every token."""
    lens = cu_seqlens.diff()
    return torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), lens)


def _allowed_rule(cu_seqlens, seg_parent, positions, window):
    """(q, kv) token indices → may q see kv: kv <= q in the same segment, or kv in the shared prefix that q's segment
    continues (seg_parent); with a window, also fewer than `window` positions back (positions, not packed indices:
    a suffix is not laid out next to its prefix)."""
    seg = _segments(cu_seqlens)
    parent = seg_parent if seg_parent is not None else torch.full_like(cu_seqlens[1:], -1)

    def allowed(q, kv):
        ok = ((seg[q] == seg[kv]) & (kv <= q)) | (parent[seg[q]] == seg[kv])
        return ok if window is None else ok & (positions[q] - positions[kv] < window)

    return allowed


def block_causal_mask(
    cu_seqlens: torch.Tensor,
    total: int,
    dtype: torch.dtype,
    boolean: bool,
    seg_parent: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """(1, 1, T, T) mask by _allowed_rule (`positions`, (T,), needed with a window): boolean, or additive in
    `dtype`."""
    idx = torch.arange(total, device=cu_seqlens.device)
    allowed = _allowed_rule(cu_seqlens, seg_parent, positions, window)(idx[:, None], idx[None, :])
    if boolean:
        return allowed[None, None]
    mask = torch.zeros(total, total, dtype=dtype, device=cu_seqlens.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def flex_block_mask(
    cu_seqlens: torch.Tensor,
    total: int,
    seg_parent: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    window: int | None = None,
):
    """The same rule as block_causal_mask as a FlexAttention BlockMask: only tiles holding allowed pairs are
    computed, so a packed row costs the sum of its segments' squares, not the square of the row."""
    from torch.nn.attention.flex_attention import create_block_mask

    rule = _allowed_rule(cu_seqlens, seg_parent, positions, window)
    return create_block_mask(lambda b, h, q, kv: rule(q, kv), None, None, total, total, device=cu_seqlens.device)


def packed_inputs(batch: PackedBatch, attn: str, needs: AttentionNeeds, dtype: torch.dtype) -> tuple[object, dict]:
    """What the backbone's forward takes for `attn` on this micro-batch besides tokens and positions: its
    attention_mask (one mask, or one per layer type) and the extra keyword arguments our kernels read."""
    total, positions = batch.processed_tokens, batch.position_ids[0]
    if attn in VARLEN_IMPLS:
        shared = batch.kv_index is not None
        return None, dict(
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens_k if shared else batch.cu_seqlens,
            max_length_q=batch.max_seqlen,
            max_length_k=batch.max_seqlen_k if shared else batch.max_seqlen,
            bigrm_kv_index=batch.kv_index,
            bigrm_windows=needs.windows,
        )
    if attn == "flex":
        return needs.per_layer(lambda w: flex_block_mask(batch.cu_seqlens, total, batch.seg_parent, positions, w)), {}
    if attn == "sdpa" and (rows := SegmentRows.of(batch, needs.windows)).cheaper_than_dense(total):
        return None, {"bigrm_rows": rows, "bigrm_windows": needs.windows}
    boolean = attn == "sdpa"  # eager adds its mask to the logits
    return needs.per_layer(
        lambda w: block_causal_mask(batch.cu_seqlens, total, dtype, boolean, batch.seg_parent, positions, w)
    ), {}
