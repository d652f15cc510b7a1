"""The backbone matrix: for every family in conftest.BACKBONES (sliding windows, per-layer-type windows,
soft-capping, the model's own scaling, grouped-query heads, MoE, rope scaling), packed and prompt-shared rewards and
gradients equal each sequence's plain transformers forward alone (fp32), under every CPU backend; what a backend
cannot compute is refused with a clear error before any work."""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from bigrm import cli
from bigrm.artifacts import export
from bigrm.config import DataConfig
from bigrm.data.packing import collate
from bigrm.data.sequences import Group
from bigrm.errors import ConfigError
from bigrm.inference import scoring
from bigrm.kinds import Scalar
from bigrm.model.attention import attention_needs, read_attention_needs, resolve_attn
from bigrm.model.packed_attention import SegmentRows
from bigrm.model.reward_model import RewardModel, load_classifier
from tests.helpers.groups import install_stand_in, shared_groups
from tests.helpers.models import BACKBONE_SHAPE, BACKBONES, SOFTCAPPED

_references: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}


def groups(seed: int = 0):
    """Three prompts of 5-30 tokens with 2-6 completions each: every sequence is longer than the 8-token windows."""
    return shared_groups(seed, ks=(2, 3, 6), prompt_len=(5, 30))


def reference(path, family: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each sequence forwarded alone through plain transformers (its own default attention): the rewards, and the
    gradients of sum(w * rewards). Computed once per family."""
    if family not in _references:  # first asked for under no_grad or not: gradients either way
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        seqs = [torch.from_numpy(s)[None] for g in groups() for s in g.seqs]
        with torch.enable_grad():
            rewards = torch.stack([model(input_ids=s).logits[0, 0] for s in seqs])
            (rewards * torch.linspace(-1, 1, len(rewards))).sum().backward()
        _references[family] = rewards.detach(), {n: p.grad for n, p in model.named_parameters()}
    return _references[family]


def packed(model: RewardModel, share: bool, grads: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rewards = model(collate(groups(), pad_id=0, pad_to_multiple=16, share_prompt=share))
    if not grads:
        return rewards.detach(), {}
    (rewards * torch.linspace(-1, 1, len(rewards))).sum().backward()
    return rewards.detach(), {n: p.grad for n, p in model.classifier.named_parameters()}


def assert_matches(path, family: str, got: tuple, grads: bool = True) -> None:
    want, want_grads = reference(path, family)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)
    for name, grad in want_grads.items() if grads else ():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def reward_model(path, attn: str) -> RewardModel:
    tok = AutoTokenizer.from_pretrained(path)
    return RewardModel(load_classifier(str(path), torch.float32, attn, tok), attn)


@pytest.mark.parametrize("share", [False, True], ids=["packed", "shared"])
@pytest.mark.parametrize("attn", ["sdpa-rows", "sdpa-dense", "eager"])
@pytest.mark.parametrize("family", list(BACKBONES))
def test_rewards_and_gradients_equal_per_sequence_forward(backbone_dir, monkeypatch, family, attn, share):
    """sdpa in both of its layouts (forced: segments as padded rows, the whole row under the dense mask) and eager."""
    path = backbone_dir(family)
    backend, _, layout = attn.partition("-")
    if family in SOFTCAPPED and backend == "sdpa":
        pytest.skip("soft-capping is refused under sdpa: test_soft_capping_needs_a_backend_that_computes_it")
    if layout:
        monkeypatch.setattr(SegmentRows, "cheaper_than_dense", lambda self, total: layout == "rows")
    assert_matches(path, family, packed(reward_model(path, backend), share))


@pytest.mark.parametrize("family", ["mistral", "qwen2_sliding", "gemma2", "gemma3"])
def test_flex_masks_and_score_mod_equal_per_sequence_forward(backbone_dir, family):
    """FlexAttention's per-layer block masks (windows in positions) and soft-capping score_mod, on CPU (forward only
    there: no CPU backward)."""
    path = backbone_dir(family)
    model = reward_model(path, "flex").eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's notice that uncompiled it is a slow reference: meant here
        for share in (False, True):
            assert_matches(path, family, packed(model, share, grads=False), grads=False)


KERNEL_CASES = [("mistral", "torch-2.11"), ("gemma3", "torch-2.11"), ("gemma3", "flash_attn"), ("gemma2", "flash_attn")]


@pytest.mark.parametrize("share", [False, True], ids=["packed", "shared"])
@pytest.mark.parametrize("family,kernel", KERNEL_CASES)
def test_varlen_kernels_get_each_layers_window_and_softcap(backbone_dir, monkeypatch, family, kernel, share):
    """The CUDA kernels' window_size / softcap arguments, per layer, checked on CPU with stand-in kernels of the real
    signatures (test_model.install_stand_in)."""
    path = backbone_dir(family)
    attn = install_stand_in(monkeypatch, kernel)
    assert_matches(path, family, packed(reward_model(path, attn), share))


def needs_of(family: str):
    model_type, features = BACKBONES[family]
    return attention_needs(AutoConfig.for_model(model_type, **{**BACKBONE_SHAPE, **features}))


def test_needs_read_per_layer_as_transformers_does():
    assert needs_of("llama").windows == (None, None) and needs_of("llama").features == []
    assert needs_of("mistral").windows == (8, 8)  # one window for every layer
    assert needs_of("qwen2").windows == (None, None)  # sliding_window is ignored without use_sliding_window
    qwen2 = needs_of("qwen2_sliding")  # layers from max_window_layers on slide
    assert qwen2.windows == (None, 8) and qwen2.layer_types == ("full_attention", "sliding_attention")
    gemma3 = needs_of("gemma3")
    assert gemma3.windows == (8, None, 8) and gemma3.smallest_window == 8 and gemma3.softcap is None
    gemma2 = needs_of("gemma2")
    assert gemma2.softcap == 2.0 and gemma2.windows == (8, None)
    moe = AutoConfig.for_model("qwen2_moe", use_sliding_window=True, sliding_window=8, **BACKBONE_SHAPE)
    assert attention_needs(moe).windows == (8, None)  # alternating; it passes no window to kernels: read per layer


def test_soft_capping_needs_a_backend_that_computes_it(monkeypatch):
    gemma2 = needs_of("gemma2")
    assert resolve_attn("auto", cuda=False, needs=gemma2) == "eager"
    with pytest.raises(ConfigError, match="'gemma2' uses attention logit soft-capping.*attn_impl=sdpa.*use eager"):
        resolve_attn("sdpa", cuda=False, needs=gemma2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "flash_attn" else real(name))
    assert resolve_attn("auto", cuda=True, needs=gemma2) == "flex"  # torch's varlen cannot soft-cap
    with pytest.raises(ConfigError, match="soft-capping.*attn_impl=varlen.*flash_attn or flex"):
        resolve_attn("varlen", cuda=True, needs=gemma2)
    assert resolve_attn("auto", cuda=True, needs=needs_of("mistral")) == "varlen"  # windows: torch >= 2.11 can


def test_windows_need_a_varlen_that_takes_them(monkeypatch):
    """torch 2.10's varlen_attn has is_causal but no window_size."""
    import bigrm.model.attention as attention_mod

    monkeypatch.setattr(attention_mod, "VARLEN_PARAMS", frozenset({"is_causal", "scale"}))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    with pytest.raises(ConfigError, match="'mistral' uses sliding-window attention.*attn_impl=varlen"):
        resolve_attn("varlen", cuda=True, needs=needs_of("mistral"))
    assert resolve_attn("varlen", cuda=True, needs=needs_of("llama")) == "varlen"


@pytest.mark.parametrize(
    "model_type,options,message",
    [
        ("cohere", {}, "no \\*ForSequenceClassification"),
        ("falcon", {}, "computes attention itself"),
        ("gemma3", {}, "multimodal"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "bidirectional"),
    ],
)
def test_families_bigrm_cannot_run_are_refused(model_type, options, message):
    with pytest.raises(ConfigError, match=message):
        attention_needs(AutoConfig.for_model(model_type, **options))


def score_rows(tmp_path, n: int = 3):
    """Rows whose prompts and completions are longer than the 8-token windows."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "green", "quick", "seven"]
    text = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
    rows = [{"prompt": text(12), "chosen": text(int(rng.integers(6, 20))), "rejected": text(9)} for _ in range(n)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_bigrm_score_equals_plain_transformers(backbone_dir, tmp_path, family):
    """`bigrm score`'s path (its attention chosen for the model: eager for soft-capping on CPU), with and without
    shared prompts, against each scored sequence alone through plain transformers."""
    path = backbone_dir(family)
    model, tokenizer, _, _ = scoring.load_model(str(path), torch.device("cpu"), "fp32")
    assert model.attn == ("eager" if family in SOFTCAPPED else "sdpa")
    plain = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    for share in (False, True):
        results = scoring.prepare(str(score_rows(tmp_path)), DataConfig(), tokenizer)
        scoring.score(model, results, 4096, torch.device("cpu"), False, share)
        with torch.no_grad():
            want = [[plain(input_ids=torch.tensor([s.ids])).logits[0, 0].item() for s in r.scored] for r in results]
        assert max(len(s.ids) for r in results for s in r.scored) > 8
        np.testing.assert_allclose([r.rewards for r in results], want, atol=1e-5, rtol=0)


def test_bigrm_score_refuses_sdpa_for_soft_capping(backbone_dir, tmp_path, capsys):
    out = tmp_path / "scored.jsonl"
    args = ["--model", str(backbone_dir("gemma2")), "--data", str(score_rows(tmp_path)), "--out", str(out)]
    assert cli.score_main([*args, "--attn_impl", "sdpa"]) == 2
    assert "uses attention logit soft-capping, which attn_impl=sdpa cannot compute" in capsys.readouterr().err
    assert not out.exists()


def test_export_check_includes_a_sequence_longer_than_the_window(backbone_dir, monkeypatch):
    """The first held-out groups are short; the self-check adds a longer one, and a packed forward that ignores the
    window (the old bug) then fails it, where on the short groups alone it passed."""
    path = backbone_dir("mistral")
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 9, size=(4, 2))  # at most the 8-token window
    short = [Group(tuple(rng.integers(3, 400, size=int(n)) for n in pair), "") for pair in lengths]
    long = groups()[:1]
    held_out = short + long
    assert export.verification_groups(held_out, None) == short
    assert export.verification_groups(held_out, 8) == short + long
    assert export.verification_groups(held_out[1:], 8) == held_out[1:]  # a long one is among the first four

    model = reward_model(path, "sdpa").eval()
    model.needs = read_attention_needs("")  # the old behaviour: no window in any mask or kernel
    monkeypatch.setattr("bigrm.model.packed_attention._layer_window", lambda module, kw: None)

    def problem(verify) -> str | None:
        batch, seqs, _ = export._verify_batch(verify, 0, torch.device("cpu"))
        with torch.no_grad():
            expected = model(batch)
        return export.check(expected, Scalar().plain_rewards(path, seqs, torch.device("cpu")), 1e-4, path)

    assert problem(short) is None  # what the old self-check saw
    assert "does not reproduce the trained model" in problem(export.verification_groups(held_out, 8))
