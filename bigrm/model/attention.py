"""Attention over packed rows: what a model's config asks of attention, the backends that compute it, their masks.

A packed micro-batch holds many segments in one row; attention must stay inside each segment (and, with shared
prompts, reach the group's prefix). bigrm registers its own attention functions with transformers:
  sdpa           per micro-batch the cheaper of: every segment as one row of padded batches bucketed by length
                 (cost about S * L^2), or the whole row under a block-diagonal causal 4-D mask (cost T^2); position
                 ids alone do NOT isolate segments
  eager          the model's plain attention (it soft-caps itself) under the 4-D mask
  varlen         torch.nn.attention.varlen.varlen_attn over cu_seqlens (CUDA)
  flash_attn     flash_attn_varlen_func over cu_seqlens (CUDA, when flash-attn is installed)
  flex           FlexAttention with a block-sparse mask built from cu_seqlens (CUDA; forward-only on CPU)
With share_prompt a group's common prefix is laid out once: its suffixes see it through the mask, or, for the varlen
kernels, through keys gathered per suffix (prefix + suffix) with separate query/key boundaries.

Each layer also gets what the model's config asks of it (AttentionNeeds): a causal sliding window, measured in
positions (a shared prefix and its suffixes are not adjacent in the packed row), and attention logit soft-capping. A
backend that cannot compute one of them is refused by resolve_attn before any work.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bigrm.data.packing import PackedBatch
from bigrm.errors import ConfigError

# no "flash" in a registered name: transformers takes any such name for its own flash-attention loader
VARLEN_IMPLS = {"varlen": "bigrm_varlen", "flash_attn": "bigrm_fa_varlen"}
# the name each of our backends is registered under with transformers; eager is the model's own
HF_ATTN = {**VARLEN_IMPLS, "flex": "bigrm_flex", "sdpa": "bigrm_sdpa"}
CUDA_ONLY = (*VARLEN_IMPLS, "flex")
WINDOWS, SOFTCAP = "sliding-window attention", "attention logit soft-capping"
LAYER_TYPES = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class AttentionNeeds:
    """What a model's config asks of attention, per layer, read as transformers reads it for its masks."""

    model_type: str
    windows: tuple[int | None, ...]  # per layer: a query sees itself and the window - 1 positions before it; None: all
    layer_types: tuple[str, ...] | None  # the keys the model looks its per-layer masks up by, where it has them
    softcap: float | None  # attention logits become softcap * tanh(logits / softcap)

    @property
    def smallest_window(self) -> int | None:
        return min((w for w in self.windows if w is not None), default=None)

    @property
    def features(self) -> list[str]:
        return [f for f, used in ((WINDOWS, self.smallest_window), (SOFTCAP, self.softcap)) if used]

    def per_layer(self, build: Callable[[int | None], object]):
        """The attention_mask argument of the backbone: one mask when every layer has the same window, else one per
        layer type (the models whose layers differ take a {layer type: mask} mapping). Each window built once."""
        built = {w: build(w) for w in dict.fromkeys(self.windows)}
        if len(built) == 1:
            return next(iter(built.values()))
        return {t: built[w] for t, w in zip(self.layer_types, self.windows, strict=True)}


def attention_needs(config) -> AttentionNeeds:
    """The attention a transformers config asks for, or a ConfigError naming what bigrm cannot run."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    name = config.model_type
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ConfigError(f"model type {name!r}: transformers has no *ForSequenceClassification for it")
    if not MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)].is_backend_compatible():
        raise ConfigError(
            f"model type {name!r}: its transformers code computes attention itself (not through the attention "
            "interface), so bigrm cannot keep packed sequences apart in it"
        )
    if config.get_text_config() is not config:
        raise ConfigError(f"model type {name!r} is multimodal; bigrm trains text models (use its text-only config)")
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        raise ConfigError(f"model type {name!r} is configured for bidirectional attention; bigrm's is causal")
    window = getattr(config, "sliding_window", None) or None  # Qwen2-MoE writes 0 for none
    layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:  # one mask for every layer: a window, when the config sets one, applies to all
        return AttentionNeeds(name, (window,) * layers, None, getattr(config, "attn_logit_softcapping", None))
    unknown = set(types) - LAYER_TYPES
    if unknown:
        raise ConfigError(f"model type {name!r}: bigrm's packed attention cannot compute {sorted(unknown)} layers")
    if "sliding_attention" in types and window is None:
        raise ConfigError(f"model type {name!r}: sliding_attention layers but no sliding_window in the config")
    windows = tuple(window if t == "sliding_attention" else None for t in types[:layers])
    return AttentionNeeds(name, windows, tuple(types[:layers]), getattr(config, "attn_logit_softcapping", None))


def read_attention_needs(path: str) -> AttentionNeeds:
    """attention_needs of the model at `path` (its config only: no weights are read); "" is bigrm's built-in tiny
    Llama."""
    from transformers import AutoConfig

    if path:
        return attention_needs(AutoConfig.from_pretrained(path))
    from bigrm.builtin.tiny import ARCHS

    spec = json.loads(ARCHS["llama"].read_text())
    return attention_needs(AutoConfig.for_model(spec.pop("model_type"), **spec))


def varlen_signature() -> frozenset[str]:
    """The keyword options of this torch's varlen_attn, read once at import: inside a compiled block the compiler
    could not trace `inspect`. Empty before torch 2.10."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return frozenset()
    from torch.nn.attention import varlen

    return frozenset(inspect.signature(varlen.varlen_attn).parameters)


VARLEN_PARAMS = varlen_signature()


# the backends that can compute each feature; torch 2.10's varlen_attn has only is_causal, later ones take a window
CAPABLE = {SOFTCAP: ("eager", "flash_attn", "flex"), WINDOWS: ("sdpa", "eager", "flash_attn", "flex", "varlen")}


def _can(attn: str, feature: str) -> bool:
    return attn in CAPABLE[feature] and (attn != "varlen" or "window_size" in VARLEN_PARAMS)


def check_backend(attn: str, needs: AttentionNeeds) -> None:
    """A ConfigError when `attn` cannot compute what the model asks of attention, naming the backends that can."""
    for feature in needs.features:
        if not _can(attn, feature):
            able = " or ".join(a + (" (torch >= 2.11)" if a == "varlen" else "") for a in CAPABLE[feature])
            raise ConfigError(
                f"model type {needs.model_type!r} uses {feature}, which attn_impl={attn} cannot compute; use {able} "
                "(flash_attn, flex and varlen need CUDA), or auto"
            )


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
    gqa = "enable_gqa" in VARLEN_PARAMS
    if q.shape[1] != k.shape[1] and not gqa:  # torch 2.10 has no grouped-query option
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    extra = {"enable_gqa": q.shape[1] != k.shape[1]} if gqa else {}
    # torch 2.10 spells causality is_causal; later versions a (left, right) window, (-1, 0) being causal and
    # (w - 1, 0) a query with the w - 1 keys before it (transformers' window: kv > q - w)
    if "window_size" in VARLEN_PARAMS:
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


def _has_varlen() -> bool:
    """torch's own varlen attention: torch >= 2.10, and flash-attention kernels need Ampere (sm80) or newer."""
    if not VARLEN_PARAMS:
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


def resolve_attn(attn_impl: str, cuda: bool, needs: AttentionNeeds) -> str:
    """The config's attention choice → what runs on this device for this model, or a ConfigError. `auto` on CUDA:
    flash-attn when installed, else torch's varlen kernel when it can compute what the model asks, else
    FlexAttention; on CPU sdpa, or eager for a model that soft-caps its attention logits."""
    if attn_impl == "auto":
        if not cuda:
            return "sdpa" if all(_can("sdpa", f) for f in needs.features) else "eager"
        if importlib.util.find_spec("flash_attn"):
            return "flash_attn"
        return "varlen" if _has_varlen() and all(_can("varlen", f) for f in needs.features) else "flex"
    if attn_impl in CUDA_ONLY and not cuda:
        raise ConfigError(f"model.attn_impl={attn_impl} needs CUDA; use sdpa or auto on CPU")
    if attn_impl == "flash_attn" and not importlib.util.find_spec("flash_attn"):
        raise ConfigError("model.attn_impl=flash_attn but the flash-attn package is not installed")
    if attn_impl == "varlen" and not _has_varlen():
        raise ConfigError("model.attn_impl=varlen needs torch >= 2.10 and an sm80+ GPU; use flex or auto")
    check_backend(attn_impl, needs)
    return attn_impl


def hf_attn_implementation(attn: str) -> str:
    return HF_ATTN.get(attn, attn)


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
