"""LoRA / QLoRA: what trains, packed parity of the adapted model, merged exports against the adapter forward, and
2-rank ZeRO-3 runs (train, save only what trained, resume exactly, export, score both forms alike)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bigrm import options
from bigrm.artifacts import export
from bigrm.config import LoraConfig, QuantizationConfig
from bigrm.data.packing import collate
from bigrm.errors import ConfigError
from bigrm.kinds import Scalar
from bigrm.model import adapters
from bigrm.model.reward_model import RewardModel, load_classifier, parameter_counts
from tests.helpers.groups import random_groups


def adapted(path, bits: int = 0, seed: int = 0, **lora):
    """An adapted classifier with random adapter updates (fresh LoRA would equal the base), and its settings."""
    tok = AutoTokenizer.from_pretrained(path)
    settings = adapters.Settings(str(path), LoraConfig(r=4, **lora), QuantizationConfig(bits=bits))
    classifier = load_classifier(str(path), torch.float32, "sdpa", tok, quant=settings.quantization if bits else None)
    adapters.add_lora(classifier, settings.lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in classifier.named_parameters():
            if "lora_B" in name or name.startswith("score."):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return classifier.eval(), settings, tok


def trained_state(classifier) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in classifier.named_parameters() if p.requires_grad}


def one_by_one(classifier, groups) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(
            [classifier(input_ids=torch.from_numpy(s)[None]).logits[0, 0].float() for g in groups for s in g.seqs]
        )


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_only_adapters_and_head_train(arch, request):
    path = request.getfixturevalue(f"{arch}_dir")
    plain = AutoModelForSequenceClassification.from_pretrained(path)
    backbone = getattr(plain, plain.base_model_prefix)
    linear = [n for n, m in backbone.named_modules() if isinstance(m, torch.nn.Linear)]
    classifier, _, _ = adapted(path)
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    assert {"score.weight"} <= trainable
    assert all(".lora_A." in n or ".lora_B." in n or n.startswith("score.") for n in trainable)
    # every linear layer of the backbone has an adapter, the head has none
    adapted_layers = {n.split(".lora_")[0] for n in trainable if ".lora_" in n}
    assert adapted_layers == {f"{plain.base_model_prefix}.{n}" for n in linear}
    total, count = parameter_counts(classifier)
    assert count == sum(p.numel() for n, p in classifier.named_parameters() if n in trainable)
    assert total == sum(p.numel() for p in classifier.parameters())

    with_embeddings, _, _ = adapted(path, train_embeddings=True)
    embed = with_embeddings.get_input_embeddings().weight
    assert embed.requires_grad and sum(p.requires_grad for p in with_embeddings.parameters()) == len(trainable) + 1


def test_target_modules_by_name(llama_dir):
    classifier, _, _ = adapted(llama_dir, target_modules=["q_proj", "v_proj"])
    layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in classifier.named_parameters() if ".lora_" in n}
    assert layers == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['qkv'\] name no linear layer.*q_proj"):
        adapted(llama_dir, target_modules=["qkv"])


def test_quantization_needs_lora_and_valid_values():
    with pytest.raises(ConfigError, match="quantization.bits: a quantised backbone cannot be trained"):
        options.load(None, ["--quantization.bits", "4"])
    with pytest.raises(ConfigError, match="quantization.bits"):
        options.load(None, ["--lora.r", "8", "--quantization.bits", "3"])
    with pytest.raises(ConfigError, match="quantization.type"):
        options.load(None, ["--lora.r", "8", "--quantization.bits", "4", "--quantization.type", "int4"])
    cfg = options.load(None, ["--r", "8", "--bits", "4", "--alpha", "32"])
    assert (cfg.lora.r, cfg.quantization.bits, cfg.lora.alpha) == (8, 4, 32.0)


def test_four_bit_base_counts_every_weight(llama_dir):
    full, _, _ = adapted(llama_dir)
    quantised, _, _ = adapted(llama_dir, bits=4)
    assert any(type(m).__name__ == "Linear4bit" for m in quantised.modules())
    assert parameter_counts(quantised) == parameter_counts(full)


@pytest.mark.parametrize("kind, double_quant", [("nf4", True), ("fp4", False)])
def test_quantization_and_lora_options_reach_the_layers(llama_dir, kind, double_quant):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    quant = QuantizationConfig(bits=4, type=kind, double_quant=double_quant)
    classifier = load_classifier(str(llama_dir), torch.float32, "sdpa", tok, quant=quant)
    adapters.add_lora(classifier, LoraConfig(r=4, alpha=12.0, dropout=0.25))
    q_proj = classifier.model.layers[0].self_attn.q_proj
    state = q_proj.base_layer.weight.quant_state
    assert state.quant_type == kind and bool(state.nested) == double_quant
    assert q_proj.scaling["default"] == 12.0 / 4 and q_proj.lora_dropout["default"].p == 0.25


@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_packed_adapter_forward_equals_per_sequence_and_merged_export(arch, bits, request, tmp_path):
    path = request.getfixturevalue(f"{arch}_dir")
    classifier, settings, tok = adapted(path, bits=bits, seed=1)
    groups = random_groups(3, 400)
    with torch.no_grad():
        packed = RewardModel(classifier, "sdpa")(collate(groups, tok.pad_token_id, pad_to_multiple=16))
    alone = one_by_one(classifier, groups)
    # LLM.int8 computes outlier columns (found per batch) in fp16 and quantises the rest: batch-dependent rounding
    tol = 5e-5 if bits != 8 else export.tolerance(torch.float32, 8) * max(1.0, alone.abs().max().item())
    torch.testing.assert_close(packed, alone, atol=tol, rtol=1e-5)

    merged = export.adapted_classifier(settings, trained_state(classifier), torch.float32, tok, merged=True)
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    assert all(
        type(m) in (torch.nn.Linear, type(merged.score)) for m in merged.modules() if "Linear" in type(m).__name__
    )
    export.save_classifier(merged, merged.state_dict(), tok, tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    reloaded = Scalar().plain_rewards(tmp_path / "merged", [s.tolist() for g in groups for s in g.seqs], "cpu")
    # 4-bit: the merge adds the adapters into exactly the de-quantised weights the adapted forward used
    torch.testing.assert_close(reloaded, alone, atol=tol, rtol=1e-5)


@pytest.mark.parametrize("bits", [0, 4])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(llama_dir, bits):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    groups = random_groups(4, 400, n_groups=3)
    grads = []
    for checkpointing in (False, True):
        quant = QuantizationConfig(bits=bits) if bits else None
        classifier = load_classifier(str(llama_dir), torch.float32, "sdpa", tok, checkpointing, quant)
        torch.manual_seed(0)  # the adapters' A matrices start random
        adapters.add_lora(classifier, LoraConfig(r=4, dropout=0.0))
        with torch.no_grad():
            for name, p in classifier.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
        RewardModel(classifier, "sdpa").train()(collate(groups, tok.pad_token_id)).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in classifier.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
        assert grads[0][name].abs().sum() > 0, name
