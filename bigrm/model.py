"""Packed micro-batches → rewards.

The model is a Hugging Face `AutoModelForSequenceClassification` with one label: its base model is the
`AutoModel` backbone and its `score` Linear(hidden, 1) is the value head, so the trained weights load with plain
transformers. Packed rows need attention isolated per segment:
  sdpa / eager   a block-diagonal causal 4-D mask (position ids alone do NOT isolate segments)
  varlen         torch.nn.attention.varlen.varlen_attn over cu_seqlens (CUDA)
  flash_attn     flash_attn_varlen_func over cu_seqlens (CUDA, when flash-attn is installed)
With share_prompt a group's common prefix is laid out once: its suffixes see it through the mask, or, for the varlen
kernels, through keys gathered per suffix (prefix + suffix) with separate query/key boundaries.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn
from transformers import AttentionInterface, AutoModelForSequenceClassification

from bigrm.adapters import quantization_config
from bigrm.config import QuantizationConfig
from bigrm.packing import PackedBatch

VARLEN_IMPLS = {"varlen": "bigrm_varlen", "flash_attn": "bigrm_flash_attn"}


def _varlen_inputs(query, key, value, kw):
    """(T, H, D) queries, keys and values, and the boundaries. With shared prefixes the keys of a suffix are its
    prefix's tokens followed by its own, gathered here, so one varlen call with separate query/key boundaries covers
    every branch (the kernels align causality bottom-right: a suffix query sees the whole prefix and its own past)."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (1, H, T, D) → (T, H, D)
    if kw.get("bigrm_kv_index") is not None:
        k, v = k[kw["bigrm_kv_index"]], v[kw["bigrm_kv_index"]]
    return q, k, v, kw["cu_seq_lens_q"], kw["cu_seq_lens_k"], kw["max_length_q"], kw["max_length_k"]


def _torch_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    from torch.nn.attention import varlen

    q, k, v, cu_q, cu_k, max_q, max_k = _varlen_inputs(query, key, value, kw)
    gqa = q.shape[1] != k.shape[1]
    out = varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, window_size=(-1, 0), enable_gqa=gqa)
    return out[None], None


def _flash_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    from flash_attn import flash_attn_varlen_func

    q, k, v, cu_q, cu_k, max_q, max_k = _varlen_inputs(query, key, value, kw)
    out = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=True
    )
    return out[None], None


AttentionInterface.register(VARLEN_IMPLS["varlen"], _torch_varlen)
AttentionInterface.register(VARLEN_IMPLS["flash_attn"], _flash_varlen)


def resolve_attn(attn_impl: str, cuda: bool) -> str:
    """The config's attention choice → what runs on this device."""
    if attn_impl == "auto":
        if not cuda:
            return "sdpa"
        return "flash_attn" if importlib.util.find_spec("flash_attn") else "varlen"
    if attn_impl in VARLEN_IMPLS and not cuda:
        raise ValueError(f"model.attn_impl={attn_impl} needs CUDA; use sdpa or auto on CPU")
    if attn_impl == "flash_attn" and not importlib.util.find_spec("flash_attn"):
        raise ValueError("model.attn_impl=flash_attn but the flash-attn package is not installed")
    return attn_impl


def hf_attn_implementation(attn: str) -> str:
    return VARLEN_IMPLS.get(attn, attn)


def block_causal_mask(
    cu_seqlens: torch.Tensor, total: int, dtype: torch.dtype, boolean: bool, seg_parent: torch.Tensor | None = None
) -> torch.Tensor:
    """(1, 1, T, T) mask: token i sees token j iff j <= i in the same segment, or j is in the shared prefix that
    i's segment continues (seg_parent)."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), lens)  # (T,)
    pos = torch.arange(total, device=cu_seqlens.device)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    if seg_parent is not None:
        allowed |= seg_parent[seg][:, None] == seg[None, :]
    if boolean:
        return allowed[None, None]
    mask = torch.zeros(total, total, dtype=dtype, device=cu_seqlens.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


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


def write_random_init(src: str, dest: str, seed: int) -> None:
    """Random weights for the architecture at `src`, saved with its tokenizer so `from_pretrained` can load them.

    Built outside DeepSpeed on one process, then loaded by every rank like any checkpoint: constructing from a
    config inside zero.Init does not work with transformers' weight init."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(src, num_labels=1)
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
