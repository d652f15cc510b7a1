"""Groups of random token sequences for packed-forward tests, and CPU stand-ins of the CUDA varlen kernels."""

from __future__ import annotations

import numpy as np
import torch

from bigrm.data.sequences import Group


def random_groups(seed: int, vocab: int, n_groups: int = 5) -> list[Group]:
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        k = int(rng.integers(2, 6))
        seqs = tuple(rng.integers(3, vocab, size=int(rng.integers(2, 30))).astype(np.int64) for _ in range(k))
        groups.append(Group(seqs, f"g{g}"))
    return groups


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, gqa=False, left=-1, softcap=0.0):
    """What a varlen kernel computes, one segment at a time, written out: causal attention aligned bottom-right (the
    last query is the last key), each query seeing at most `left` keys before its own (-1: all), logits soft-capped
    when `softcap`."""
    out = []
    for s in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[s] : cu_q[s + 1]], k[cu_k[s] : cu_k[s + 1]], v[cu_k[s] : cu_k[s + 1]]
        assert qs.shape[0] <= max_q and ks.shape[0] <= max_k
        if gqa:
            ks, vs = (t.repeat_interleave(qs.shape[1] // t.shape[1], dim=1) for t in (ks, vs))
        assert ks.shape[1] == qs.shape[1], "grouped-query keys reached a kernel that does not take them"
        own = torch.arange(qs.shape[0])[:, None] + ks.shape[0] - qs.shape[0]  # each query's own key
        key = torch.arange(ks.shape[0])[None]
        allowed = (key <= own) & ((key >= own - left) if left >= 0 else True)
        logits = torch.einsum("qhd,khd->hqk", qs, ks) * (scale or qs.shape[-1] ** -0.5)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", weights, vs))
    return torch.cat(out)


def install_stand_in(monkeypatch, kernel: str) -> str:
    """A CPU stand-in for a CUDA kernel, with its real signature (torch 2.11+: window_size and enable_gqa; torch
    2.10: is_causal, no GQA, no window; flash-attn: causal, window_size, softcap); returns the attn_impl using it."""
    import sys
    import types

    from torch.nn.attention import varlen

    import bigrm.model.attention as attention_mod

    def new_torch(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        left, right = window_size
        assert right == 0 and left >= -1, "varlen_attn: not causal"
        return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, enable_gqa, left)

    def old_torch(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, scale=None):
        assert is_causal
        return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale)

    def flash(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        softcap=0.0,
    ):  # fmt: skip
        assert causal and dropout_p == 0.0
        return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, True, window_size[0], softcap)

    if kernel == "flash_attn":
        monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash))
        return "flash_attn"
    monkeypatch.setattr(varlen, "varlen_attn", new_torch if kernel == "torch-2.11" else old_torch)
    monkeypatch.setattr(attention_mod, "VARLEN_PARAMS", attention_mod.varlen_signature())
    return "varlen"


def shared_groups(seed: int, ks=(2, 3, 16), prompt_len=(5, 40)) -> list[Group]:
    """Prompts followed by completions; some completions start alike, so the common prefix may end inside them."""
    rng = np.random.default_rng(seed)
    groups = []
    for k in ks:
        prompt = rng.integers(3, 400, size=int(rng.integers(*prompt_len)))
        lead = rng.integers(3, 400, size=int(rng.integers(0, 3)))  # shared start of every completion
        seqs = tuple(
            np.concatenate([prompt, lead, rng.integers(3, 400, size=int(rng.integers(1, 12)))]).astype(np.int64)
            for _ in range(k)
        )
        groups.append(Group(seqs, f"k{k}"))
    return groups
