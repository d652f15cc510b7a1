"""Packed rewards against the slow reference: each sequence forwarded alone, unpadded, through plain HF."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bigrm.data.packing import collate
from bigrm.data.sequences import Group
from bigrm.data.tokenizer import prepare_tokenizer
from bigrm.model.attention import read_attention_needs, resolve_attn
from bigrm.model.packed_attention import SegmentRows, block_causal_mask, flex_block_mask
from bigrm.model.reward_model import RewardModel, compile_blocks, load_classifier
from tests.helpers.groups import install_stand_in, random_groups

PLAIN = read_attention_needs("")  # the built-in tiny Llama: plain causal attention


def assert_equals_per_sequence(model: RewardModel, path, batch, groups) -> None:
    """Packed rewards, and the gradients of a weighted sum of them, equal each sequence's plain HF forward alone."""
    reference = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    packed = model(batch)
    alone = torch.stack([reference(input_ids=torch.from_numpy(s)[None]).logits[0, 0] for g in groups for s in g.seqs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    weights = torch.linspace(-1, 1, len(alone))
    (packed * weights).sum().backward()
    (alone * weights).sum().backward()
    got = dict(model.classifier.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rewards_equal_per_sequence_forward(arch, attn, request):
    path = str(request.getfixturevalue(f"{arch}_dir"))
    tok = AutoTokenizer.from_pretrained(path)
    model = RewardModel(load_classifier(path, torch.float32, attn, tok), attn).eval()
    reference = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    groups = random_groups(0, 400)
    batch = collate(groups, tok.pad_token_id, pad_to_multiple=16)
    with torch.no_grad():
        packed = model(batch)
        alone = torch.stack(
            [reference(input_ids=torch.from_numpy(s)[None]).logits[0, 0] for g in groups for s in g.seqs]
        )
    assert packed.shape == (sum(len(g.seqs) for g in groups),)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_position_ids_alone_do_not_isolate_segments(llama_dir):
    """Why the explicit mask exists: without it the second segment sees the first."""
    tok = AutoTokenizer.from_pretrained(llama_dir)
    classifier = load_classifier(str(llama_dir), torch.float32, "sdpa", tok).eval()
    groups = random_groups(1, 400, n_groups=2)
    batch = collate(groups, tok.pad_token_id)
    with torch.no_grad():
        hidden = classifier.model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
        leaky = classifier.score(hidden[0, batch.last_index])[:, 0]
        isolated = RewardModel(classifier, "sdpa")(batch)
    assert not torch.allclose(leaky[1:], isolated[1:], atol=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_match_per_sequence_reference(llama_dir, checkpointing):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    classifier = load_classifier(str(llama_dir), torch.float32, "sdpa", tok, gradient_checkpointing=checkpointing)
    assert any(getattr(m, "gradient_checkpointing", False) for m in classifier.modules()) == checkpointing
    packed_model = RewardModel(classifier, "sdpa").train()
    reference = AutoModelForSequenceClassification.from_pretrained(llama_dir, dtype=torch.float32)
    groups = random_groups(2, 400, n_groups=3)
    packed_model(collate(groups, tok.pad_token_id)).square().sum().backward()
    sum(reference(input_ids=torch.from_numpy(s)[None]).logits[0, 0] ** 2 for g in groups for s in g.seqs).backward()
    got = dict(packed_model.classifier.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_block_causal_mask():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    allowed = block_causal_mask(cu, 5, torch.float32, boolean=True)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    additive = block_causal_mask(cu, 5, torch.float32, boolean=False)[0, 0]
    assert torch.equal(additive == 0, expected)
    assert (additive[~expected] == torch.finfo(torch.float32).min).all()


def test_resolve_attn(monkeypatch):
    import importlib.util

    import bigrm.model.attention as attention_mod

    real = importlib.util.find_spec
    installed = {"flash_attn": False}

    def find_spec(name):
        if name in installed:
            return object() if installed[name] else None
        return real(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    assert resolve_attn("auto", cuda=False, needs=PLAIN) == "sdpa"
    assert resolve_attn("eager", cuda=False, needs=PLAIN) == "eager"
    assert resolve_attn("auto", cuda=True, needs=PLAIN) == "varlen"
    for impl in ("varlen", "flash_attn", "flex"):
        with pytest.raises(ValueError, match="needs CUDA"):
            resolve_attn(impl, cuda=False, needs=PLAIN)
    with pytest.raises(ValueError, match="not installed"):
        resolve_attn("flash_attn", cuda=True, needs=PLAIN)
    installed["flash_attn"] = True
    assert resolve_attn("auto", cuda=True, needs=PLAIN) == "flash_attn"
    installed["flash_attn"] = False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (7, 0))  # V100: no flash kernels
    assert resolve_attn("auto", cuda=True, needs=PLAIN) == "flex"
    with pytest.raises(ValueError, match="sm80"):
        resolve_attn("varlen", cuda=True, needs=PLAIN)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 0))
    monkeypatch.setattr(attention_mod, "VARLEN_PARAMS", frozenset())  # torch < 2.10
    assert resolve_attn("auto", cuda=True, needs=PLAIN) == "flex"
    assert resolve_attn("flex", cuda=True, needs=PLAIN) == "flex"


@pytest.mark.parametrize("share", [False, True])
def test_flex_rewards_equal_per_sequence_forward(llama_dir, share):
    """The FlexAttention path's block mask, on CPU (forward only there: flex has no CPU backward)."""
    from tests.helpers.groups import shared_groups

    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = RewardModel(load_classifier(str(llama_dir), torch.float32, "flex", tok), "flex").eval()
    reference = AutoModelForSequenceClassification.from_pretrained(llama_dir, dtype=torch.float32).eval()
    groups = shared_groups(4) if share else random_groups(4, 400)
    batch = collate(groups, tok.pad_token_id, pad_to_multiple=16, share_prompt=share)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's notice that uncompiled it is a slow reference: meant here
        packed = model(batch)
        alone = torch.stack(
            [reference(input_ids=torch.from_numpy(s)[None]).logits[0, 0] for g in groups for s in g.seqs]
        )
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_flex_block_mask_matches_dense_mask():
    from torch.nn.attention.flex_attention import create_mask

    cu = torch.tensor([0, 3, 5, 6, 9], dtype=torch.int32)
    parent = torch.tensor([-1, 0, 0, -1])
    dense = block_causal_mask(cu, 9, torch.float32, boolean=True, seg_parent=parent)
    block = flex_block_mask(cu, 9, parent)
    assert torch.equal(create_mask(block.mask_mod, None, None, 9, 9), dense)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_equal_eager(llama_dir, checkpointing):
    """model.compile: the same rewards and gradients over two packed lengths, without a graph per length."""
    tok = AutoTokenizer.from_pretrained(llama_dir)
    compiled = load_classifier(str(llama_dir), torch.float32, "sdpa", tok, gradient_checkpointing=checkpointing)
    assert compile_blocks(compiled) == 2
    assert all(m._z3_leaf for m in compiled.modules() if type(m).__name__ == "LlamaDecoderLayer")
    eager = load_classifier(str(llama_dir), torch.float32, "sdpa", tok)
    models = {"compiled": RewardModel(compiled, "sdpa"), "eager": RewardModel(eager, "sdpa")}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []
    for seed in (5, 6):
        batch = collate(random_groups(seed, 400), tok.pad_token_id)
        out = {}
        for name, model in models.items():
            model.zero_grad()
            rewards = model(batch)
            rewards.square().sum().backward()
            out[name] = rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.testing.assert_close(out["compiled"][0], out["eager"][0], atol=1e-5, rtol=1e-5)
        for n, g in out["eager"][1].items():
            torch.testing.assert_close(out["compiled"][1][n], g, atol=1e-5, rtol=1e-4, msg=n)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0]  # the second length compiles nothing new: dynamic shapes


def test_compile_blocks_needs_block_classes():
    with pytest.raises(ValueError, match="no transformer block"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_prepare_tokenizer_keeps_distinct_pad(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    pad = tok.pad_token_id
    prepare_tokenizer(tok)
    assert tok.pad_token_id == pad != tok.eos_token_id


def test_prepare_tokenizer_pad_equal_to_eos_uses_unk_or_adds(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    tok.pad_token = tok.eos_token
    n = len(tok)
    prepare_tokenizer(tok)  # the tiny tokenizer has no unk: a new token is added
    assert len(tok) == n + 1 and tok.pad_token_id not in (tok.eos_token_id, None)
    tok.add_special_tokens({"additional_special_tokens": [f"<extra{i}>" for i in range(600 - len(tok))]})
    classifier = load_classifier(str(llama_dir), torch.float32, "sdpa", tok)
    assert classifier.get_input_embeddings().num_embeddings == len(tok) == 600
    assert classifier.config.pad_token_id == tok.pad_token_id

    tok = AutoTokenizer.from_pretrained(llama_dir)
    tok.pad_token = tok.eos_token
    tok.unk_token = tok.bos_token
    prepare_tokenizer(tok)
    assert tok.pad_token_id == tok.bos_token_id and len(tok) == n


def test_bf16_model_reads_rewards_in_fp32(llama_dir):
    """Under bf16 the head runs in fp32 on the bf16 hidden states: rewards keep fp32 precision for the loss, and
    its gradient reaches the bf16 head weights."""
    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = RewardModel(load_classifier(str(llama_dir), torch.bfloat16, "sdpa", tok), "sdpa")
    batch = collate(random_groups(7, 400), tok.pad_token_id)
    seen = []
    model.backbone.register_forward_hook(lambda module, args, out: seen.append(out.last_hidden_state[0]))
    rewards = model(batch)
    assert rewards.dtype == torch.float32 and seen[0].dtype == torch.bfloat16
    hidden = seen[0]
    head = model.classifier.score.weight
    expected = hidden[batch.last_index].float() @ head.float()[0]
    torch.testing.assert_close(rewards, expected, atol=1e-6, rtol=1e-6)
    assert not torch.equal(rewards, expected.bfloat16().float())  # more digits than a bf16 head would give
    rewards.sum().backward()
    assert head.grad is not None and head.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("rows", [True, False])
def test_sdpa_rows_and_dense_mask_equal_per_sequence_reference(llama_dir, monkeypatch, rows, share):
    """sdpa's two layouts, each forced: segments as rows of a padded batch, and the whole row under the dense mask."""
    from tests.helpers.groups import shared_groups

    monkeypatch.setattr(SegmentRows, "cheaper_than_dense", lambda self, total: rows)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = RewardModel(load_classifier(str(llama_dir), torch.float32, "sdpa", tok), "sdpa")
    groups = shared_groups(8) if share else random_groups(8, 400)
    batch = collate(groups, tok.pad_token_id, pad_to_multiple=16, share_prompt=share)
    assert_equals_per_sequence(model, llama_dir, batch, groups)


def test_sdpa_takes_the_cheaper_layout():
    def rows(lengths: list[int], share: bool = False) -> tuple[SegmentRows, int]:
        prompt = np.arange(3, 3 + share * 100, dtype=np.int64)
        groups = [
            Group(tuple(np.concatenate([prompt, np.arange(s, s + n, dtype=np.int64)]) for s in (400, 450)), "")
            for n in lengths
        ]
        batch = collate(groups, pad_id=0, share_prompt=share)
        return SegmentRows.of(batch), batch.processed_tokens

    alike, total = rows([20] * 10)  # 20 segments of 20: one bucket, 20 * 20 * 20 entries against 400 * 400
    assert alike.cheaper_than_dense(total) and len(alike.buckets) == 1
    assert alike.buckets[0].q_index.shape == (20, 20) and torch.equal(alike.order, torch.arange(400))
    mixed, total = rows([300, 40, 3])  # three length classes: no row is padded to more than twice its length
    assert [b.q_index.shape for b in mixed.buckets] == [(2, 3), (2, 40), (2, 300)]
    cost = 2 * 3 * 3 + 2 * 40 * 40 + 2 * 300 * 300  # attention entries over the buckets
    assert total == 686 and mixed.cheaper_than_dense(total) and not mixed.cheaper_than_dense(int(cost**0.5))
    shared, total = rows([10] * 4, share=True)  # the 100-token prefixes in one bucket, the short suffixes in another
    assert [b.q_index.shape for b in shared.buckets] == [(8, 10), (4, 100)]
    assert shared.buckets[0].k_index.shape == (8, 110)  # a suffix's keys: its prefix, then itself


@pytest.mark.parametrize("kernel", ["torch-2.11", "torch-2.10", "flash_attn"])
@pytest.mark.parametrize("share", [False, True])
def test_varlen_glue_equals_per_sequence_reference(llama_dir, monkeypatch, kernel, share):
    """The CUDA kernels' inputs, checked on CPU with stand-in kernels: boundaries, gathered shared-prefix keys and
    grouped-query heads give the per-sequence rewards and gradients (windows and soft-capping: test_backbones)."""
    from tests.helpers.groups import shared_groups

    attn = install_stand_in(monkeypatch, kernel)
    tok = AutoTokenizer.from_pretrained(llama_dir)  # 4 query heads, 2 key/value heads
    model = RewardModel(load_classifier(str(llama_dir), torch.float32, attn, tok), attn)
    groups = shared_groups(9) if share else random_groups(9, 400)
    assert_equals_per_sequence(model, llama_dir, collate(groups, tok.pad_token_id, share_prompt=share), groups)


def test_head_gram_appends_the_head_rows_products_in_training_only(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    classifier = load_classifier(str(llama_dir), torch.float32, "sdpa", tok, num_labels=2)
    model = RewardModel(classifier, "sdpa", vector=True, head_gram=True)
    batch = collate(random_groups(0, 100, n_groups=2), 0)
    n, w = len(batch.labels.seg_group), classifier.score.weight.detach()
    trained = model.train()(batch)
    assert trained.shape == (n + 2, 2)
    torch.testing.assert_close(trained[n:].detach(), w @ w.T, atol=0, rtol=0)
    evaluated = model.eval()(batch)
    assert evaluated.shape == (n, 2)
    torch.testing.assert_close(trained[:n].detach(), evaluated, atol=1e-6, rtol=0)
