"""share_prompt: each group's common token prefix encoded once. Rewards and gradients must equal the unshared
packed forward (itself checked against per-sequence forwards in test_model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from bigrm.data.packing import collate, layout_tokens, shared_prefix
from bigrm.data.sequences import Group
from bigrm.model.reward_model import RewardModel, load_classifier
from tests.helpers.groups import shared_groups


def test_layout():
    a = np.array([1, 2, 3, 4, 9], dtype=np.int64)
    b = np.array([1, 2, 3, 5], dtype=np.int64)
    assert shared_prefix((a, b)) == 3
    assert shared_prefix((a, a[:3])) == 2  # every sequence keeps its final token in its suffix
    g = Group((a, b), "")
    assert layout_tokens(g, True) == 3 + 2 + 1 and layout_tokens(g, False) == 9
    batch = collate([g], pad_id=0, share_prompt=True)
    assert batch.input_ids[0].tolist() == [1, 2, 3, 4, 9, 5]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3]  # suffixes continue from the prefix length
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 6] and batch.seg_parent.tolist() == [-1, 0, 0]
    assert batch.last_index.tolist() == [4, 5]
    assert batch.kv_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5]
    assert batch.cu_seqlens_k.tolist() == [0, 3, 8, 12] and batch.max_seqlen_k == 5


def forward(model: RewardModel, groups, share: bool):
    model.zero_grad()
    rewards = model(collate(groups, pad_id=0, share_prompt=share))
    (rewards * torch.linspace(-1, 1, len(rewards))).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return rewards.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_rewards_and_gradients_equal_unshared(arch, attn, request):
    path = str(request.getfixturevalue(f"{arch}_dir"))
    tok = AutoTokenizer.from_pretrained(path)
    model = RewardModel(load_classifier(path, torch.float32, attn, tok), attn)
    groups = shared_groups(0)
    plain, plain_grads = forward(model, groups, share=False)
    shared, shared_grads = forward(model, groups, share=True)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    assert shared_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, 0), enable_gqa=False):
    """What a varlen kernel computes, one sequence at a time: causal aligned bottom-right (query i of Lq sees keys
    up to i + Lk - Lq), as flash attention does."""
    out = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
        if enable_gqa:
            ki, vi = (t.repeat_interleave(qi.shape[1] // t.shape[1], dim=1) for t in (ki, vi))
        lq, lk = len(qi), len(ki)
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        attn = torch.nn.functional.scaled_dot_product_attention(
            qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1), attn_mask=allowed, scale=scale
        )
        out.append(attn.transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("share", [False, True])
def test_varlen_path_gathers_the_right_keys(llama_dir, monkeypatch, share):
    """The CUDA varlen path's plumbing (boundaries, key gathering, GQA), run on CPU with a reference kernel."""
    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", reference_varlen)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    groups = shared_groups(1)
    with torch.no_grad():
        want = RewardModel(load_classifier(str(llama_dir), torch.float32, "sdpa", tok), "sdpa")(collate(groups, 0))
        got = RewardModel(load_classifier(str(llama_dir), torch.float32, "varlen", tok), "varlen")(
            collate(groups, 0, share_prompt=share)
        )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_eval_and_score_with_shared_prompts_match(llama_dir, tmp_path):
    import json

    from bigrm import cli
    from bigrm.config import LossConfig
    from bigrm.training.evaluate import evaluate_rewards

    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = RewardModel(load_classifier(str(llama_dir), torch.float32, "sdpa", tok), "sdpa").eval()
    groups = shared_groups(2, ks=(2, 4, 7, 3))
    kw = dict(budget=400, window=8, pad_id=0, device=torch.device("cpu"), cfg=LossConfig())
    shared, shared_rewards = evaluate_rewards(model, groups, **kw, share_prompt=True)
    alone, rewards = evaluate_rewards(model, groups, **kw)
    assert shared == pytest.approx(alone)
    torch.testing.assert_close(shared_rewards, rewards, atol=1e-5, rtol=0)

    rows = [{"prompt": "write a review:", "ranked_outputs": [" great superb", " awful", " the it was"]}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs = []
    for flags in ([], ["--share_prompt"]):
        out = tmp_path / f"scored{len(flags)}.jsonl"
        assert cli.score_main(["--model", str(llama_dir), "--data", str(data), "--out", str(out), *flags]) == 0
        outs.append(json.loads(out.read_text())["rewards"])
    assert outs[1] == pytest.approx(outs[0], abs=1e-5)
