"""What a model's config asks of attention, and which attention backend runs it.

A packed micro-batch holds many segments in one row; attention must stay inside each segment (and, with shared
prompts, reach the group's prefix). The backends (their kernels and masks are bigrm.model.packed_attention's):
  sdpa           per micro-batch the cheaper of: every segment as one row of padded batches bucketed by length
                 (cost about S * L^2), or the whole row under a block-diagonal causal 4-D mask (cost T^2); position
                 ids alone do NOT isolate segments
  eager          the model's plain attention (it soft-caps itself) under the 4-D mask
  varlen         torch.nn.attention.varlen.varlen_attn over cu_seqlens (CUDA)
  flash_attn     flash_attn_varlen_func over cu_seqlens (CUDA, when flash-attn is installed)
  flex           FlexAttention with a block-sparse mask built from cu_seqlens (CUDA; forward-only on CPU)

Each layer also gets what the model's config asks of it (AttentionNeeds): a causal sliding window, measured in
positions (a shared prefix and its suffixes are not adjacent in the packed row), and attention logit soft-capping. A
backend that cannot compute one of them is refused by resolve_attn before any work.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bigrm.errors import ConfigError

# no "flash" in a registered name: transformers takes any such name for its own flash-attention loader
VARLEN_IMPLS = {"varlen": "bigrm_varlen", "flash_attn": "bigrm_fa_varlen"}
# the name each of our backends is registered under with transformers; eager is the model's own
HF_ATTN = {**VARLEN_IMPLS, "flex": "bigrm_flex", "sdpa": "bigrm_sdpa"}
CUDA_ONLY = (*VARLEN_IMPLS, "flex")
WINDOWS, SOFTCAP = "sliding-window attention", "attention logit soft-capping"
LAYER_TYPES = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class AttentionNeeds:
    """What a model's config asks of attention, per layer, read as transformers reads it for its masks."""

    model_type: str
    windows: tuple[int | None, ...]  # per layer: a query sees itself and the window - 1 positions before it; None: all
    layer_types: tuple[str, ...] | None  # the keys the model looks its per-layer masks up by, where it has them
    softcap: float | None  # attention logits become softcap * tanh(logits / softcap)

    @property
    def smallest_window(self) -> int | None:
        return min((w for w in self.windows if w is not None), default=None)

    @property
    def features(self) -> list[str]:
        return [f for f, used in ((WINDOWS, self.smallest_window), (SOFTCAP, self.softcap)) if used]

    def per_layer(self, build: Callable[[int | None], object]):
        """The attention_mask argument of the backbone: one mask when every layer has the same window, else one per
        layer type (the models whose layers differ take a {layer type: mask} mapping). Each window built once."""
        built = {w: build(w) for w in dict.fromkeys(self.windows)}
        if len(built) == 1:
            return next(iter(built.values()))
        return {t: built[w] for t, w in zip(self.layer_types, self.windows, strict=True)}


def attention_needs(config) -> AttentionNeeds:
    """The attention a transformers config asks for, or a ConfigError naming what bigrm cannot run."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    name = config.model_type
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ConfigError(f"model type {name!r}: transformers has no *ForSequenceClassification for it")
    if not MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)].is_backend_compatible():
        raise ConfigError(
            f"model type {name!r}: its transformers code computes attention itself (not through the attention "
            "interface), so bigrm cannot keep packed sequences apart in it"
        )
    if config.get_text_config() is not config:
        raise ConfigError(f"model type {name!r} is multimodal; bigrm trains text models (use its text-only config)")
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        raise ConfigError(f"model type {name!r} is configured for bidirectional attention; bigrm's is causal")
    window = getattr(config, "sliding_window", None) or None  # Qwen2-MoE writes 0 for none
    layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:  # one mask for every layer: a window, when the config sets one, applies to all
        return AttentionNeeds(name, (window,) * layers, None, getattr(config, "attn_logit_softcapping", None))
    unknown = set(types) - LAYER_TYPES
    if unknown:
        raise ConfigError(f"model type {name!r}: bigrm's packed attention cannot compute {sorted(unknown)} layers")
    if "sliding_attention" in types and window is None:
        raise ConfigError(f"model type {name!r}: sliding_attention layers but no sliding_window in the config")
    windows = tuple(window if t == "sliding_attention" else None for t in types[:layers])
    return AttentionNeeds(name, windows, tuple(types[:layers]), getattr(config, "attn_logit_softcapping", None))


def read_config(path: str):
    """The transformers config of the model at `path` (no weights are read); "" is bigrm's built-in tiny Llama."""
    from transformers import AutoConfig

    if path:
        return AutoConfig.from_pretrained(path)
    from bigrm.builtin.tiny import ARCHS

    spec = json.loads(ARCHS["llama"].read_text())
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def read_attention_needs(path: str) -> AttentionNeeds:
    """attention_needs of the model at `path` (read_config)."""
    return attention_needs(read_config(path))


def varlen_signature() -> frozenset[str]:
    """The keyword options of this torch's varlen_attn, read once at import: inside a compiled block the compiler
    could not trace `inspect`. Empty before torch 2.10."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return frozenset()
    from torch.nn.attention import varlen

    return frozenset(inspect.signature(varlen.varlen_attn).parameters)


VARLEN_PARAMS = varlen_signature()


# the backends that can compute each feature; torch 2.10's varlen_attn has only is_causal, later ones take a window
CAPABLE = {SOFTCAP: ("eager", "flash_attn", "flex"), WINDOWS: ("sdpa", "eager", "flash_attn", "flex", "varlen")}


def _can(attn: str, feature: str) -> bool:
    return attn in CAPABLE[feature] and (attn != "varlen" or "window_size" in VARLEN_PARAMS)


def check_backend(attn: str, needs: AttentionNeeds) -> None:
    """A ConfigError when `attn` cannot compute what the model asks of attention, naming the backends that can."""
    for feature in needs.features:
        if not _can(attn, feature):
            able = " or ".join(a + (" (torch >= 2.11)" if a == "varlen" else "") for a in CAPABLE[feature])
            raise ConfigError(
                f"model type {needs.model_type!r} uses {feature}, which attn_impl={attn} cannot compute; use {able} "
                "(flash_attn, flex and varlen need CUDA), or auto"
            )


def _has_varlen() -> bool:
    """torch's own varlen attention: torch >= 2.10, and flash-attention kernels need Ampere (sm80) or newer."""
    if not VARLEN_PARAMS:
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


def resolve_attn(attn_impl: str, cuda: bool, needs: AttentionNeeds) -> str:
    """The config's attention choice → what runs on this device for this model, or a ConfigError. `auto` on CUDA:
    flash-attn when installed, else torch's varlen kernel when it can compute what the model asks, else
    FlexAttention; on CPU sdpa, or eager for a model that soft-caps its attention logits."""
    if attn_impl == "auto":
        if not cuda:
            return "sdpa" if all(_can("sdpa", f) for f in needs.features) else "eager"
        if importlib.util.find_spec("flash_attn"):
            return "flash_attn"
        return "varlen" if _has_varlen() and all(_can("varlen", f) for f in needs.features) else "flex"
    if attn_impl in CUDA_ONLY and not cuda:
        raise ConfigError(f"model.attn_impl={attn_impl} needs CUDA; use sdpa or auto on CPU")
    if attn_impl == "flash_attn" and not importlib.util.find_spec("flash_attn"):
        raise ConfigError("model.attn_impl=flash_attn but the flash-attn package is not installed")
    if attn_impl == "varlen" and not _has_varlen():
        raise ConfigError("model.attn_impl=varlen needs torch >= 2.10 and an sm80+ GPU; use flex or auto")
    check_backend(attn_impl, needs)
    return attn_impl


def hf_attn_implementation(attn: str) -> str:
    """The name transformers knows `attn` by; ours are registered when bigrm.model.packed_attention is imported."""
    return HF_ATTN.get(attn, attn)
