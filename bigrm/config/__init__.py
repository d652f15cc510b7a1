"""Typed run configuration: one dataclass field per option, its type the values it takes, its docstring its help.

`python launch/train.py --help` prints every field's docstring, so this package is the single place an option is
defined and described; bigrm.options reads them from YAML recipes and `--key value` arguments (jsonargparse), which
check each value against its type (`Literal` choices included). What a type cannot say is checked in __post_init__.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bigrm.config.data import REWARD_CONVENTIONS, STEPS_WITH_ATTRIBUTES, DataConfig, SyntheticConfig
from bigrm.config.model import ATTN_IMPLS, AttnImpl, LoraConfig, ModelConfig, QuantizationConfig
from bigrm.config.training import LossConfig, TrainConfig
from bigrm.errors import ConfigError


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.quantization.bits and not self.lora.r:
            raise ConfigError("quantization.bits: a quantised backbone cannot be trained; set lora.r > 0 (QLoRA)")
        if self.loss.ensemble and not self.lora.r:
            # full fine-tuned members would each be a whole model: N copies of every weight and optimiser state
            raise ConfigError("loss.ensemble: members are LoRA adapter sets on one frozen base; set lora.r > 0")
        if self.loss.ensemble and self.train.sequence_parallel > 1:
            # each member switches adapters between forwards: a split row's exchange would have to run per member
            raise ConfigError("loss.ensemble: not with train.sequence_parallel > 1 (members are not split yet)")
        weights, names = self.loss.attribute_weights, self.data.attributes
        if weights and len(weights) != len(names):
            raise ConfigError(
                f"loss.attribute_weights: {len(weights)} weight(s) for {len(names)} data.attributes; give one per "
                "attribute, or none for their mean"
            )


def attribute_weights(names: list[str], loss: LossConfig) -> tuple[float, ...]:
    """The weights of the scalar reward of an attribute head over `names` (data.attributes): loss.attribute_weights,
    or 1 each (the sum) when empty."""
    return tuple(float(w) for w in loss.attribute_weights) or (1.0,) * len(names)


__all__ = [
    "ATTN_IMPLS",
    "REWARD_CONVENTIONS",
    "STEPS_WITH_ATTRIBUTES",
    "AttnImpl",
    "Config",
    "DataConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "QuantizationConfig",
    "SyntheticConfig",
    "TrainConfig",
    "attribute_weights",
]
