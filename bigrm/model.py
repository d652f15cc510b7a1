"""Packed micro-batches → rewards.

The model is a Hugging Face `AutoModelForSequenceClassification` with one label: its base model is the
`AutoModel` backbone and its `score` Linear(hidden, 1) is the value head, so the trained weights load with plain
transformers. Packed rows need attention isolated per segment:
  sdpa           per micro-batch the cheaper of: every segment as one row of padded batches bucketed by length
                 (cost about S * L^2), or the whole row under a block-diagonal causal 4-D mask (cost T^2); position
                 ids alone do NOT isolate segments
  eager          the model's plain attention under the 4-D mask
  varlen         torch.nn.attention.varlen.varlen_attn over cu_seqlens (CUDA)
  flash_attn     flash_attn_varlen_func over cu_seqlens (CUDA, when flash-attn is installed)
  flex           FlexAttention with a block-sparse mask built from cu_seqlens (CUDA; forward-only on CPU)
With share_prompt a group's common prefix is laid out once: its suffixes see it through the mask, or, for the varlen
kernels, through keys gathered per suffix (prefix + suffix) with separate query/key boundaries.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, AutoModelForSequenceClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bigrm.adapters import quantization_config
from bigrm.config import ConfigError, QuantizationConfig
from bigrm.packing import PackedBatch

# no "flash" in a registered name: transformers takes any such name for its own flash-attention loader
VARLEN_IMPLS = {"varlen": "bigrm_varlen", "flash_attn": "bigrm_fa_varlen"}
# the name each of our backends is registered under with transformers; eager is the model's own
HF_ATTN = {**VARLEN_IMPLS, "flex": "bigrm_flex", "sdpa": "bigrm_sdpa"}
CUDA_ONLY = (*VARLEN_IMPLS, "flex")


def _varlen_inputs(query, key, value, kw):
    """(T, H, D) queries, keys and values, and the boundaries. With shared prefixes the keys of a suffix are its
    prefix's tokens followed by its own, gathered here, so one varlen call with separate query/key boundaries covers
    every branch (the kernels align causality bottom-right: a suffix query sees the whole prefix and its own past)."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (1, H, T, D) → (T, H, D)
    if kw.get("bigrm_kv_index") is not None:
        k, v = k[kw["bigrm_kv_index"]], v[kw["bigrm_kv_index"]]
    return q, k, v, kw["cu_seq_lens_q"], kw["cu_seq_lens_k"], kw["max_length_q"], kw["max_length_k"]


def varlen_signature() -> frozenset[str]:
    """The keyword options of this torch's varlen_attn, read once at import: inside a compiled block the compiler
    could not trace `inspect`. Empty before torch 2.10."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return frozenset()
    from torch.nn.attention import varlen

    return frozenset(inspect.signature(varlen.varlen_attn).parameters)


VARLEN_PARAMS = varlen_signature()


def _torch_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    from torch.nn.attention import varlen

    q, k, v, cu_q, cu_k, max_q, max_k = _varlen_inputs(query, key, value, kw)
    gqa = "enable_gqa" in VARLEN_PARAMS
    if q.shape[1] != k.shape[1] and not gqa:  # torch 2.10 has no grouped-query option
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    extra = {"enable_gqa": q.shape[1] != k.shape[1]} if gqa else {}
    # torch 2.10 spells causality is_causal; later versions a (left, right) window, (-1, 0) being causal
    extra.update({"window_size": (-1, 0)} if "window_size" in VARLEN_PARAMS else {"is_causal": True})
    out = varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **extra)
    return out[None], None


def _flash_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    from flash_attn import flash_attn_varlen_func

    q, k, v, cu_q, cu_k, max_q, max_k = _varlen_inputs(query, key, value, kw)
    out = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=True
    )
    return out[None], None


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process: uncompiled it is a dense reference implementation. Dynamic shapes,
    since every packed micro-batch has its own length."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    from torch.nn.attention.flex_attention import flex_attention

    # inside a compiled block dynamo traces flex_attention itself. On CPU (forward only) the uncompiled reference
    # runs: inductor's CPU flex template fails to build with dynamic shapes.
    eager = torch.compiler.is_compiling() or not query.is_cuda
    fn = flex_attention if eager else _compiled_flex()
    out = fn(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None  # (1, H, T, D) → (1, T, H, D), as HF's attention functions return


@dataclass
class RowBucket:
    """Segments of one length class as the rows of a padded batch."""

    q_index: torch.Tensor  # (n, Lq) token position of each query slot (0 in padding)
    k_index: torch.Tensor  # (n, Lk) token position of each key slot (a suffix's keys: its prefix, then itself)
    allowed: torch.Tensor  # (n, 1, Lq, Lk) causal, aligned bottom-right; padded query slots see every real key
    slots: torch.Tensor  # (real queries,) the real slots of the flattened (n * Lq) rows, in token order


@dataclass
class SegmentRows:
    """Every segment as one row of a padded batch, rows bucketed by power-of-two query length (so a row is padded
    to at most twice its length, and a long shared prefix does not pad its short suffixes): SDPA then costs
    sum(n * Lq * Lk) over buckets, not T^2 as under the packed row's mask."""

    buckets: list[RowBucket]
    order: torch.Tensor  # (T,) each token's place among the buckets' concatenated outputs

    @staticmethod
    def of(batch: PackedBatch) -> SegmentRows:
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
            causal = ik[None, None, :] <= iq[None, :, None] + (lk - lq)[:, None, None]
            slots = q_valid.flatten().nonzero()[:, 0]
            k_index = batch.kv_index[k_slot] if shared else k_slot
            buckets.append(RowBucket(q_index, k_index, (k_valid[:, None, :] & causal)[:, None], slots))
            positions.append(q_index.flatten()[slots])
        order = torch.empty(batch.processed_tokens, dtype=torch.long, device=cu_q.device)
        order[torch.cat(positions)] = torch.arange(batch.processed_tokens, device=cu_q.device)
        return SegmentRows(buckets, order)

    def cheaper_than_dense(self, total: int) -> bool:
        return sum(b.allowed.shape[0] * b.allowed.shape[2] * b.allowed.shape[3] for b in self.buckets) < total**2


@torch.compiler.disable  # the bucket count varies per micro-batch: compiled, each count would be a recompilation
def _segment_attention(query, key, value, rows: SegmentRows, scaling, dropout):
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (1, H, T, D) → (T, H, D)
    outs = []
    for b in rows.buckets:  # (n, L, H, D) → (n, H, L, D)
        bq, bk, bv = q[b.q_index].transpose(1, 2), k[b.k_index].transpose(1, 2), v[b.k_index].transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(
            bq, bk, bv, attn_mask=b.allowed, dropout_p=dropout, scale=scaling, enable_gqa=bq.shape[1] != bk.shape[1]
        )  # (n, H, Lq, D)
        outs.append(out.transpose(1, 2).flatten(0, 1)[b.slots])
    return torch.cat(outs)[rows.order][None]  # (1, T, H, D)


def _sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    rows = kw.pop("bigrm_rows", None)
    if rows is None:  # the dense block-diagonal mask was cheaper for this micro-batch
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
    return _segment_attention(query, key, value, rows, scaling, dropout), None


AttentionInterface.register(HF_ATTN["sdpa"], _sdpa)
AttentionInterface.register(HF_ATTN["varlen"], _torch_varlen)
AttentionInterface.register(HF_ATTN["flash_attn"], _flash_varlen)
AttentionInterface.register(HF_ATTN["flex"], _flex)


def _has_varlen() -> bool:
    """torch's own varlen attention: torch >= 2.10, and flash-attention kernels need Ampere (sm80) or newer."""
    if not VARLEN_PARAMS:
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


def resolve_attn(attn_impl: str, cuda: bool) -> str:
    """The config's attention choice → what runs on this device. `auto` on CUDA: flash-attn when installed, else
    torch's varlen kernel, else FlexAttention; on CPU sdpa."""
    if attn_impl == "auto":
        if not cuda:
            return "sdpa"
        if importlib.util.find_spec("flash_attn"):
            return "flash_attn"
        return "varlen" if _has_varlen() else "flex"
    if attn_impl in CUDA_ONLY and not cuda:
        raise ConfigError(f"model.attn_impl={attn_impl} needs CUDA; use sdpa or auto on CPU")
    if attn_impl == "flash_attn" and not importlib.util.find_spec("flash_attn"):
        raise ConfigError("model.attn_impl=flash_attn but the flash-attn package is not installed")
    if attn_impl == "varlen" and not _has_varlen():
        raise ConfigError("model.attn_impl=varlen needs torch >= 2.10 and an sm80+ GPU; use flex or auto")
    return attn_impl


def hf_attn_implementation(attn: str) -> str:
    return HF_ATTN.get(attn, attn)


def _segments(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(T,) the segment of every token."""
    lens = cu_seqlens.diff()
    return torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), lens)


def block_causal_mask(
    cu_seqlens: torch.Tensor, total: int, dtype: torch.dtype, boolean: bool, seg_parent: torch.Tensor | None = None
) -> torch.Tensor:
    """(1, 1, T, T) mask: token i sees token j iff j <= i in the same segment, or j is in the shared prefix that
    i's segment continues (seg_parent)."""
    seg = _segments(cu_seqlens)
    pos = torch.arange(total, device=cu_seqlens.device)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    if seg_parent is not None:
        allowed |= seg_parent[seg][:, None] == seg[None, :]
    if boolean:
        return allowed[None, None]
    mask = torch.zeros(total, total, dtype=dtype, device=cu_seqlens.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def flex_block_mask(cu_seqlens: torch.Tensor, total: int, seg_parent: torch.Tensor | None = None):
    """The same rule as block_causal_mask as a FlexAttention BlockMask: only tiles holding allowed pairs are
    computed, so a packed row costs the sum of its segments' squares, not the square of the row."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = _segments(cu_seqlens)
    parent = seg_parent if seg_parent is not None else torch.full_like(cu_seqlens[1:], -1)

    def allowed(b, h, q, kv):
        return ((seg[q] == seg[kv]) & (kv <= q)) | (parent[seg[q]] == seg[kv])

    return create_block_mask(allowed, None, None, total, total, device=cu_seqlens.device)


class RewardModel(nn.Module):
    """Wraps the HF classifier so DeepSpeed drives one forward: packed batch → (N,) rewards."""

    def __init__(self, classifier: nn.Module, attn: str):
        super().__init__()
        self.classifier = classifier
        self.attn = attn

    @property
    def backbone(self) -> nn.Module:
        return getattr(self.classifier, self.classifier.base_model_prefix)

    def forward(self, batch: PackedBatch, every_token: bool = False) -> torch.Tensor:
        """(N,) one reward per scored segment, read at its final token; or (T,) the value at every token."""
        extra = {}
        if self.attn in VARLEN_IMPLS:
            shared = batch.kv_index is not None
            extra = dict(
                cu_seq_lens_q=batch.cu_seqlens,
                cu_seq_lens_k=batch.cu_seqlens_k if shared else batch.cu_seqlens,
                max_length_q=batch.max_seqlen,
                max_length_k=batch.max_seqlen_k if shared else batch.max_seqlen,
                bigrm_kv_index=batch.kv_index,
            )
            mask = None
        elif self.attn == "flex":
            mask = flex_block_mask(batch.cu_seqlens, batch.processed_tokens, batch.seg_parent)
        elif self.attn == "sdpa" and (rows := SegmentRows.of(batch)).cheaper_than_dense(batch.processed_tokens):
            extra, mask = {"bigrm_rows": rows}, None
        else:
            dtype = next(self.classifier.parameters()).dtype
            mask = block_causal_mask(
                batch.cu_seqlens, batch.processed_tokens, dtype, self.attn == "sdpa", batch.seg_parent
            )
        hidden = self.backbone(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False, **extra
        ).last_hidden_state[0]  # (T, H)
        picked = hidden if every_token else hidden[batch.last_index]
        # the head runs in fp32 so rewards and the loss keep full precision under bf16 training
        head = self.classifier.score
        bias = None if head.bias is None else head.bias.float()
        return nn.functional.linear(picked.float(), head.weight.float(), bias)[:, 0]


def prepare_tokenizer(tokenizer) -> None:
    """Give the tokenizer a pad token distinct from EOS (HF classifiers score the last non-pad token): the unknown
    token when there is one, else a new token (load_classifier then grows the embeddings if needed)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return
    tokenizer.add_special_tokens({"pad_token": "<|bigrm_pad|>"})


def _int8_cast_notice(record: logging.LogRecord) -> bool:
    """False for LLM.int8's note, logged at every layer call, that it quantises activations through fp16: by design."""
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def load_classifier(
    path: str,
    dtype: torch.dtype | str,
    attn: str,
    tokenizer,
    gradient_checkpointing: bool = False,
    quant: QuantizationConfig | None = None,
) -> nn.Module:
    """The HF classifier with one label, its pad token set (and embeddings grown if the tokenizer gained one);
    with `quant`, its backbone's linear layers quantised by bitsandbytes (the value head is not)."""
    if quant and quant.bits == 8:
        # the same function object each time: logging adds a filter once however often models are loaded
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_int8_cast_notice)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=1,
        dtype=dtype,
        attn_implementation=hf_attn_implementation(attn),
        quantization_config=quantization_config(quant, dtype) if quant else None,
    )
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights in place for a CPU inference kernel at the first no-grad forward: that
        # would rewrite ZeRO-3's partitioned storage (and fails on layers narrower than its block)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def compile_blocks(classifier: nn.Module) -> int:
    """torch.compile the forward of every transformer block (the classes HF names in `_no_split_modules`), with
    dynamic lengths; returns how many. Each block is also made a ZeRO-3 leaf: DeepSpeed then gathers its weights
    in one hook around the block instead of hooks on every layer inside it, which the compiler cannot trace
    (each would split the block's graph). Blocks, not the whole model: the per-batch mask and gather code stays
    eager."""
    from deepspeed.utils import set_z3_leaf_module

    names = set(getattr(classifier, "_no_split_modules", None) or ())
    blocks = [m for m in classifier.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"model.compile: {type(classifier).__name__} names no transformer block class to compile")
    for block in blocks:
        set_z3_leaf_module(block, True)
        block.forward = torch.compile(block.forward, dynamic=True)
    return len(blocks)


def _full_numel(p: nn.Parameter) -> int:
    quant_state = getattr(p, "quant_state", None)  # bitsandbytes packs two 4-bit weights per byte
    if quant_state is not None:
        return quant_state.shape.numel()
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def parameter_counts(module: nn.Module, matmul_only: bool = False) -> tuple[int, int]:
    """(all, trainable) weights of `module`, counting ZeRO-3 partitioned and 4-bit packed weights at full size.
    `matmul_only`: only the weights of linear layers (adapters included), the ones that cost FLOPs per token."""
    if matmul_only:
        params = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    else:
        params = list(module.parameters())
    total = trainable = 0
    for p in params:
        n = _full_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def write_random_init(src: str, dest: str, seed: int, dtype: torch.dtype = torch.float32) -> None:
    """Random weights for the architecture at `src`, saved (in `dtype`) with its tokenizer so `from_pretrained` can
    load them.

    Built outside DeepSpeed on one process, then loaded by every rank like any checkpoint: constructing from a
    config inside zero.Init does not work with transformers' weight init."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(src, num_labels=1)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
