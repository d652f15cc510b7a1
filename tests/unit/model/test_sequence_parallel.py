"""train.sequence_parallel's pieces on one process: the alignment padding a split row gets, the checks of its size,
and the split forward wired through DeepSpeed's exchange (a group of one: the exchange is the identity). Its
equality with one process over several ranks is tests/runs/test_sequence_parallel.py's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from bigrm import dist
from bigrm.config import TrainConfig
from bigrm.config.checks import sequence_parallel as check_sizes
from bigrm.data.packing import collate
from bigrm.errors import ConfigError
from bigrm.model import sequence_parallel
from bigrm.model.reward_model import RewardModel, load_classifier
from tests.helpers.groups import shared_groups


def values_and_grads(model: RewardModel, batch, every_token: bool = False):
    model.zero_grad()
    values = model(batch, every_token)
    (values * torch.linspace(-1, 1, len(values))).sum().backward()
    return values.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("share", [False, True])
def test_padding_changes_no_value(llama_dir, share):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = RewardModel(load_classifier(str(llama_dir), torch.float32, "eager", tok), "eager")
    batch = collate(shared_groups(0), pad_id=0, share_prompt=share)
    padded = sequence_parallel.padded(batch, 8)
    assert padded.processed_tokens % 8 == 0 and padded.processed_tokens > batch.processed_tokens
    assert sequence_parallel.padded(padded, 8) is padded
    assert padded.cu_seqlens[-1] == padded.processed_tokens and padded.seg_parent[-1] == -1
    if share:
        assert padded.cu_seqlens_k[-1] == len(padded.kv_index)
    want, want_grads = values_and_grads(model, batch)
    got, got_grads = values_and_grads(model, padded)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_split_forward_of_a_group_of_one_is_the_plain_forward(llama_dir, attn):
    import torch.distributed as torch_dist

    tok = AutoTokenizer.from_pretrained(llama_dir)
    plain = RewardModel(load_classifier(str(llama_dir), torch.float32, attn, tok), attn)
    batch = collate(shared_groups(1), pad_id=0, share_prompt=True)
    dist.init()
    try:
        classifier = load_classifier(str(llama_dir), torch.float32, attn, tok)
        split = sequence_parallel.SequenceSplit(classifier, attn, torch_dist.new_group([0]))
        model = RewardModel(classifier, attn, split=split)
        assert classifier.config._attn_implementation == sequence_parallel.ULYSSES
        for every_token in (False, True):
            want, want_grads = values_and_grads(plain, batch, every_token)
            got, got_grads = values_and_grads(model, batch, every_token)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
            assert got_grads.keys() == want_grads.keys()
            for name, grad in want_grads.items():
                torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    finally:
        dist.shutdown()


def test_sizes_that_cannot_split_are_refused():
    check_sizes(2, 4, 8, 2)
    with pytest.raises(ConfigError, match=r"^train.sequence_parallel: 3 does not divide the 4 ranks launched"):
        check_sizes(3, 4, 12, 3)
    with pytest.raises(ConfigError, match="does not divide the model's 6 attention heads"):
        check_sizes(4, 8, 6, 2)
    with pytest.raises(ConfigError, match="does not divide the model's 2 key/value heads"):
        check_sizes(4, 8, 8, 2)
    with pytest.raises(ConfigError, match="train.sequence_parallel: must be > 0"):
        TrainConfig(sequence_parallel=0)


def test_heads_of_a_model_without_grouped_queries(neox_dir):
    assert sequence_parallel._heads(AutoConfig.from_pretrained(neox_dir))[:2] == (4, 4)
