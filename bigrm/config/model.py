"""model.*, lora.*, quantization.*: the backbone, its adapters and its quantisation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from bigrm import precision
from bigrm.config.checks import bounds
from bigrm.errors import ConfigError

AttnImpl = Literal["auto", "sdpa", "eager", "varlen", "flash_attn", "flex"]
ATTN_IMPLS = get_args(AttnImpl)


@dataclass
class ModelConfig:
    """model.*: the backbone and how it runs."""

    path: str = ""
    """A local Hugging Face model directory (weights, config, tokenizer). Empty: the built-in tiny Llama,
    random-initialised from bigrm/assets/tiny-llama.json with a locally built tokenizer."""
    attn_impl: AttnImpl = "auto"
    """Attention over packed rows, never across segments. `auto`: on CUDA `flash_attn` when flash-attn is installed,
    else `varlen` (torch.nn.attention.varlen, torch >= 2.10, sm80+), else `flex` (FlexAttention with a block-sparse
    mask); on CPU `sdpa`: per micro-batch the cheaper of the segments as rows of a padded batch and the packed row under
    a block-diagonal causal mask. `eager`: that mask with the model's plain attention. `varlen`, `flash_attn` and `flex`
    need CUDA. Every backend honours the model's sliding windows; soft-capped attention logits (Gemma-2) need `eager`,
    `flash_attn` or `flex`, which `auto` then picks; a backend that cannot compute what the model asks is refused at
    start-up."""
    dtype: precision.Name = "auto"
    """Weights and compute dtype: `auto` (bf16 on CUDA, fp32 on CPU), `bf16` or `fp32`."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    compile: bool = False
    """torch.compile each transformer block (dynamic shapes): fuses norms, rotary and activations. The first steps pay
    the compilation."""
    random_init: bool = False
    """Initialise weights randomly from the config at model.path instead of loading its weights."""


@dataclass
class LoraConfig:
    """lora.*: low-rank adapters on a frozen backbone."""

    r: int = 0
    """LoRA rank. 0: train every weight of the backbone. > 0: freeze the backbone and train rank-r adapters on
    lora.target_modules; the value head is always trained fully and saved."""
    alpha: float = 16.0
    """LoRA scale numerator: adapter updates are scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=list)
    """Names of the backbone's linear layers that get adapters (the last part of the module name, e.g. [q_proj,
    v_proj]). Empty: every linear layer of the backbone."""
    train_embeddings: bool = False
    """With LoRA, also train the input token embeddings fully (saved with it)."""

    def __post_init__(self) -> None:
        bounds(self, "lora", ("alpha",), ("r",))
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if not all(self.target_modules):
            raise ConfigError(f"lora.target_modules: expected a list of module names, got {self.target_modules!r}")


@dataclass
class QuantizationConfig:
    """quantization.*: a quantised frozen backbone (QLoRA)."""

    bits: Literal[0, 4, 8] = 0
    """Load the frozen backbone quantised by bitsandbytes: 4 (QLoRA) or 8 (LLM.int8); 0: not quantised. Needs lora.r >
    0. Exports merge the adapters into the de-quantised weights in model.dtype."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 (normal float, the QLoRA default) or fp4."""
    double_quant: bool = True
    """4-bit: quantise the per-block scales too (about 0.37 bits per weight saved)."""
