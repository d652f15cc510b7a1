"""LoRA and QLoRA: how the frozen backbone is loaded (bitsandbytes), which weights train, and how the adapters merge
back into a plain classifier.

With LoRA only the adapters, the value head (and, if asked, the input embeddings) train; checkpoints hold only
those, and `Settings` (written beside them) says how to rebuild the rest from the base model directory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from bigrm.config import LoraConfig, QuantizationConfig
from bigrm.errors import ConfigError

SETTINGS_FILE = "bigrm_adapters.json"
ADAPTER = "default"


@dataclasses.dataclass(frozen=True)
class Settings:
    base: str  # the model directory the frozen weights come from
    lora: LoraConfig
    quantization: QuantizationConfig

    def write(self, dest: Path) -> None:
        (dest / SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @staticmethod
    def read(hf_dir: Path) -> Settings | None:
        """The settings saved with a LoRA checkpoint; None for a checkpoint of a fully trained model."""
        path = hf_dir / SETTINGS_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return Settings(raw["base"], LoraConfig(**raw["lora"]), QuantizationConfig(**raw["quantization"]))


def quantization_config(quant: QuantizationConfig, dtype: torch.dtype):
    """The bitsandbytes config for `from_pretrained`, or None."""
    if not quant.bits:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=quant.bits == 4,
        load_in_8bit=quant.bits == 8,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        # ZeRO-3 partitions the packed 4-bit weights as flat tensors of this dtype; storing them in the model's own
        # dtype keeps one dtype across every partitioned parameter, which ZeRO-3 requires
        bnb_4bit_quant_storage=dtype,
    )


def target_modules(classifier: nn.Module, names: list[str]) -> list[str]:
    """`lora.target_modules`, or every linear layer of the backbone (never the value head)."""
    backbone = getattr(classifier, classifier.base_model_prefix)
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)})
    unknown = [n for n in names if n not in linear]
    if unknown:
        raise ConfigError(f"lora.target_modules: {unknown} name no linear layer of the backbone; it has {linear}")
    return list(names) or linear


def add_lora(classifier: nn.Module, lora: LoraConfig, names: tuple[str, ...] = (ADAPTER,)):
    """Adapters injected into `classifier` in place, one set per name (an ensemble's members, bigrm.model.ensemble,
    each drawn in turn from the seeded RNG); everything frozen but the adapters, the value head and (if asked) the
    input embeddings. Returns the peft wrapper (for merging); train `classifier` itself."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules(classifier, lora.target_modules),
        bias="none",
    )
    # adapters in the backbone's dtype (not fp32): ZeRO-3 flattens parameters of one dtype
    wrapped = get_peft_model(classifier, config, adapter_name=names[0], autocast_adapter_dtype=False)
    for name in names[1:]:
        wrapped.add_adapter(name, copy.deepcopy(config), autocast_adapter_dtype=False)
    if len(names) > 1:  # peft trains only the active set; every member trains (the forward picks one at a time)
        for name, p in classifier.named_parameters():
            if ".lora_" in name:
                p.requires_grad_(True)
    # the head is created fresh for the reward task: it trains fully, outside peft's modules_to_save copies
    for p in classifier.score.parameters():
        p.requires_grad_(True)
    if lora.train_embeddings:
        classifier.get_input_embeddings().weight.requires_grad_(True)
    return wrapped


def adapter_names(state: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The adapter sets a LoRA run's trained weights hold (keys `...lora_A.<name>.weight`), in member order."""
    names = {key.split(".lora_A.", 1)[1].split(".", 1)[0] for key in state if ".lora_A." in key}
    return tuple(sorted(names, key=lambda n: (len(n), n))) or (ADAPTER,)


def load_trained(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Put a LoRA run's trained weights into `module`; the frozen ones stay as loaded from the base (a checkpoint
    may also hold the base's quantisation constants, which bitsandbytes layers refuse to reload on CPU)."""
    wanted = {name for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(wanted - state.keys())
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} trained weights of the adapted model, e.g. {missing[:3]}")
    module.load_state_dict({name: state[name] for name in wanted}, strict=False)


def merge(wrapped, dtype: torch.dtype) -> nn.Module:
    """The plain transformers classifier: adapters added into the (de-quantised) base weights."""
    base = wrapped.get_base_model()
    if getattr(base, "is_quantized", False):
        raise ValueError("merge needs a de-quantised base: peft would re-quantise the merged weights")
    return wrapped.merge_and_unload().to(dtype)
