"""Model FLOPs: attention pairs against the mask the model uses, the per-token formula against its definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigrm.data.packing import collate
from bigrm.model import flops
from bigrm.model.packed_attention import block_causal_mask
from bigrm.model.reward_model import parameter_counts
from tests.helpers.groups import random_groups


@pytest.mark.parametrize("share_prompt", [False, True])
def test_causal_pairs_count_what_the_mask_allows(share_prompt):
    groups = random_groups(5, 400, n_groups=6)
    prefix = np.arange(3, 20)  # a common prompt so that sharing has a prefix to lay out once
    groups = [type(g)(tuple(np.concatenate([prefix, s]) for s in g.seqs), g.source) for g in groups]
    batch = collate(groups, 0, pad_to_multiple=8, share_prompt=share_prompt)
    allowed = block_causal_mask(batch.cu_seqlens, batch.processed_tokens, torch.float32, True, batch.seg_parent)
    assert flops.causal_pairs(batch.cu_seqlens, batch.seg_parent) == int(allowed.sum())
    assert (batch.seg_parent >= 0).any() == share_prompt


def test_model_flops_per_token_and_per_pair():
    # one sequence of s tokens: 6 FLOPs per weight and token when all train, 4 when frozen, plus 6 h L s^2 roughly
    s, hidden, layers = 100, 64, 2
    pairs = s * (s + 1) // 2
    assert flops.model_flops(s, pairs, (1000, 1000), hidden, layers) == 6 * 1000 * s + 12 * hidden * layers * pairs
    assert flops.model_flops(s, 0, (1000, 10), hidden, layers) == (4 * 1000 + 2 * 10) * s


def test_matmul_weights_count_linear_layers_only(llama_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(llama_dir)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert parameter_counts(model, matmul_only=True) == (linear, linear)
    assert linear < parameter_counts(model)[0]  # embeddings and norms cost no matmul FLOPs


def test_peak_is_configured_or_known_bf16_gpu():
    assert flops.peak_tflops(500.0, torch.device("cpu"), False) == 500.0
    assert flops.peak_tflops(0.0, torch.device("cpu"), True) is None
    names = dict(flops.PEAK_BF16_TFLOPS)
    assert names["H100 PCIe"] < names["H100"]
