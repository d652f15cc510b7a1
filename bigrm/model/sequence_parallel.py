"""Ulysses sequence parallelism over bigrm's packed rows (train.sequence_parallel: N).

The N ranks of a group hold the same packed micro-batch; each embeds and runs every layer on its 1/N of the row
(positions stay those of the whole row). In each attention layer DeepSpeed's UlyssesSPAttentionHF exchanges the
shards (all-to-all): each rank then holds the whole row for 1/N of the heads and runs bigrm's own attention over it,
under the whole row's masks (segments, shared prompts, windows), and the output goes back to sequence shards. The value
head is read on the rank holding each read position and the group's values are summed into one (N + P,) on every rank:
every rank then computes the same loss, of which each rank's share of the gradient is its own positions'.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.distributed as torch_dist
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from bigrm import dist
from bigrm.config.checks import sequence_parallel as check_sizes
from bigrm.data.packing import PackedBatch
from bigrm.model.attention import hf_attn_implementation

ULYSSES = "bigrm_ulysses"  # the attention a split model runs: the exchange around its backend (bigrm_ulysses kwarg)


def _heads(config) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head width) of a transformers config."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return heads, kv, getattr(text, "head_dim", None) or text.hidden_size // heads


def join(n: int, config):
    """train.sequence_parallel = `n` for the model of transformers `config`: checked before any work (`n` divides
    the ranks launched and the model's heads, else a ConfigError), then the groups formed (dist.join_sequence_parallel:
    its mpu, None for n = 1)."""
    heads, kv, _ = _heads(config)
    check_sizes(n, dist.world(), heads, kv)
    return dist.join_sequence_parallel(n)


def _backend(attn: str):
    """bigrm's attention function for `attn`; eager is each model family's own, looked up by the calling layer."""
    name = hf_attn_implementation(attn)
    if name != "eager":
        return ALL_ATTENTION_FUNCTIONS[name]

    def eager(module, *args, **kw):
        return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kw)

    return eager


def _exchange_attention(module, query, key, value, attention_mask, **kw):
    return kw.pop("bigrm_ulysses")(module, query, key, value, attention_mask, **kw)


AttentionInterface.register(ULYSSES, _exchange_attention)


class _GroupSum(torch.autograd.Function):
    """Forward: the sum over the group of tensors each rank filled at its own rows only. Backward: the gradient as it
    is: every rank computes the same loss from the sum, and the group's gradient counts that loss once, so each rank's
    rows get its gradient there (an all-reduce adjoint would count the group's N identical losses N times)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.clone()
        torch_dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def padded(batch: PackedBatch, multiple: int) -> PackedBatch:
    """`batch` with alignment padding appended, as collate lays it out (its own segment: no real token sees it), to a
    multiple of `multiple` tokens: every rank of a group holds an equal share of the row."""
    total, pad = batch.processed_tokens, -batch.processed_tokens % multiple
    if not pad:
        return batch
    tail = torch.arange(pad, device=batch.input_ids.device)
    out = dataclasses.replace(
        batch,
        input_ids=torch.cat([batch.input_ids, torch.zeros_like(tail)[None]], 1),
        position_ids=torch.cat([batch.position_ids, tail[None]], 1),
        cu_seqlens=torch.cat([batch.cu_seqlens, batch.cu_seqlens[-1:] + pad]),
        seg_parent=torch.cat([batch.seg_parent, batch.seg_parent.new_full((1,), -1)]),
        max_seqlen=max(batch.max_seqlen, pad),
    )
    if batch.kv_index is not None:
        out.kv_index = torch.cat([batch.kv_index, total + tail])
        out.cu_seqlens_k = torch.cat([batch.cu_seqlens_k, batch.cu_seqlens_k[-1:] + pad])
        out.max_seqlen_k = max(batch.max_seqlen_k, pad)
    return out


def split(classifier, attn: str, mpu) -> SequenceSplit | None:
    """The split of `classifier` over its rank's group of `mpu` (dist.join_sequence_parallel's), None without one."""
    return None if mpu is None else SequenceSplit(classifier, attn, mpu.get_sequence_parallel_group())


class SequenceSplit:
    """This rank's part of its sequence-parallel group's forward (see the module's docstring)."""

    def __init__(self, classifier, attn: str, group):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        heads, kv, width = _heads(classifier.config)
        self.group, self.size, self.rank = group, torch_dist.get_world_size(group), torch_dist.get_rank(group)
        self.exchange = UlyssesSPAttentionHF(
            attn=_backend(attn),
            batch_size=1,
            attn_head_count=heads,
            attn_head_size=width,
            kv_head_count=kv,
            num_hidden_layers=classifier.config.get_text_config().num_hidden_layers,
            process_group=group,
            seq_length_is_variable=True,  # every packed row has its own length
        )
        classifier.config._attn_implementation = ULYSSES  # not saved: transformers drops it from config.json

    def padded(self, batch: PackedBatch) -> PackedBatch:
        return padded(batch, self.size)

    def local(self, row: torch.Tensor) -> torch.Tensor:
        """This rank's share of a (1, T) row."""
        n = row.shape[1] // self.size
        return row[:, self.rank * n : (self.rank + 1) * n]

    def kwargs(self, extra: dict) -> dict:
        return {**extra, "bigrm_ulysses": self.exchange}

    def read(self, hidden: torch.Tensor, index: torch.Tensor, head) -> torch.Tensor:
        """head(hidden of the whole row at `index`), (len(index), A) on every rank, from this rank's (T / N, H)
        `hidden`: each position read where it lives."""
        lo = self.rank * hidden.shape[0]
        mine = (index >= lo) & (index < lo + hidden.shape[0])
        local = head(hidden[index[mine] - lo])
        full = local.new_zeros(len(index), local.shape[1])
        full[mine] = local
        return _GroupSum.apply(full, self.group)

    def once(self, replicated: torch.Tensor) -> torch.Tensor:
        """A value every rank of the group computes alike from replicated weights: its gradient taken on one rank."""
        return replicated if self.rank == 0 else replicated.detach()
