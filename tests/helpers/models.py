"""Tiny random backbones of every family bigrm supports, written offline."""

from __future__ import annotations

from pathlib import Path


def make_model_dir(root: Path, arch: str, seed: int = 0) -> Path:
    from bigrm.builtin.tiny import write_tiny
    from bigrm.model.reward_model import write_random_init

    src = write_tiny(root / f"{arch}-src", arch)
    dest = root / f"{arch}-init"
    write_random_init(str(src), str(dest), seed)
    return dest


# Tiny random backbones of the families reward models are trained on, each with what sets its attention apart.
# Windows of 8 tokens: the test sequences are longer. Soft-capping at 2 and weights 10x the usual scale, so that
# capped and uncapped logits differ (at the usual scale tanh is the identity on tiny random logits).
BACKBONE_SHAPE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8
)


BACKBONES = {
    "llama": ("llama", {}),
    "llama3_rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }}),
    "mistral": ("mistral", {"sliding_window": 8}),
    "mixtral": ("mixtral", {"sliding_window": 8, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": ("qwen2", {}),
    "qwen2_sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", {"sliding_window": 8, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 2.0,
                          "initializer_range": 0.2}),
    "gemma3": ("gemma3_text", {"sliding_window": 8, "query_pre_attn_scalar": 16,
                               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                               "num_hidden_layers": 3}),
    "phi3": ("phi3", {"sliding_window": 8}),
    "olmo2": ("olmo2", {}),
    "gpt_neox": ("gpt_neox", {}),
}  # fmt: skip


def write_backbone(dest: Path, family: str, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from bigrm.builtin.tiny import build_tokenizer

    model_type, features = BACKBONES[family]
    tokenizer = build_tokenizer()
    specials = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = AutoConfig.for_model(
        model_type, **{**BACKBONE_SHAPE, **features}, vocab_size=512, num_labels=1, **specials
    )
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


WINDOWED = ["mistral", "mixtral", "qwen2_sliding", "gemma2", "gemma3", "phi3"]


SOFTCAPPED = ["gemma2"]
