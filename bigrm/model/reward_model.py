"""Packed micro-batches → rewards.

The model is a Hugging Face `AutoModelForSequenceClassification` with one label: its base model is the
`AutoModel` backbone and its `score` Linear(hidden, 1) is the value head, so the trained weights load with plain
transformers. Attention over the packed rows, which must stay inside each segment and honour what the model's config
asks of each layer (sliding windows, soft-capping), is bigrm.model.attention's (the backend) and
bigrm.model.packed_attention's (its kernels and masks).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from bigrm.config import QuantizationConfig
from bigrm.data.packing import PackedBatch
from bigrm.errors import ConfigError
from bigrm.model.adapters import quantization_config
from bigrm.model.attention import attention_needs, check_backend, hf_attn_implementation
from bigrm.model.packed_attention import packed_inputs
from bigrm.model.sequence_parallel import SequenceSplit


class RewardModel(nn.Module):
    """Wraps the HF classifier so DeepSpeed drives one forward: packed batch → (N,) rewards, or with `vector` (N, A)
    every output of an A-output head (a reward kind's, bigrm.kinds); with `head_gram`, in training, followed by the
    (A, A) products of the head's rows (the length-disentangled kind's orthogonality term)."""

    def __init__(
        self,
        classifier: nn.Module,
        attn: str,
        vector: bool = False,
        head_gram: bool = False,
        split: SequenceSplit | None = None,
    ):
        super().__init__()
        self.classifier = classifier
        self.vector = vector
        self.head_gram = head_gram
        self.attn = attn
        self.split = split  # train.sequence_parallel > 1: this rank's share of its group's forward
        self.needs = attention_needs(classifier.config)
        check_backend(attn, self.needs)

    @property
    def backbone(self) -> nn.Module:
        return getattr(self.classifier, self.classifier.base_model_prefix)

    def forward(self, batch: PackedBatch, every_token: bool = False) -> torch.Tensor:
        """(N,) one reward per scored segment, read at its final token, followed by (P,) the value at each step end
        when the batch has stepwise segments (batch.read_index); or (T,) the value at every token. With `vector`:
        (N, A) / (T, A), every output of the head."""
        dtype, split, tokens = next(self.classifier.parameters()).dtype, self.split, batch.processed_tokens
        batch = batch if split is None else split.padded(batch)
        mask, extra = packed_inputs(batch, self.attn, self.needs, dtype)
        ids, positions = batch.input_ids, batch.position_ids
        if split is not None:
            ids, positions, extra = split.local(ids), split.local(positions), split.kwargs(extra)
        hidden = self.backbone(
            input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False, **extra
        ).last_hidden_state[0]  # (T, H); under sequence parallelism this rank's (T / N, H)
        if split is None:
            values = self._head(hidden if every_token else hidden[batch.read_index])
        else:
            index = torch.arange(tokens, device=hidden.device) if every_token else batch.read_index
            values = split.read(hidden, index, self._head)
        if self.head_gram and self.classifier.training and not every_token:
            # a loss on the head's weights must see them here: ZeRO-3 gathers parameters only inside the forward
            weight = self.classifier.score.weight.float()
            gram = weight @ weight.T
            values = torch.cat([values, gram if split is None else split.once(gram)])
        return values if self.vector else values[:, 0]

    def _head(self, picked: torch.Tensor) -> torch.Tensor:
        # the head runs in fp32 so rewards and the loss keep full precision under bf16 training
        head = self.classifier.score
        bias = None if head.bias is None else head.bias.float()
        return nn.functional.linear(picked.float(), head.weight.float(), bias)


def _int8_cast_notice(record: logging.LogRecord) -> bool:
    """False for LLM.int8's note, logged at every layer call, that it quantises activations through fp16: by design."""
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def load_classifier(
    path: str,
    dtype: torch.dtype | str,
    attn: str,
    tokenizer,
    gradient_checkpointing: bool = False,
    quant: QuantizationConfig | None = None,
    num_labels: int = 1,
    fresh_head: bool = False,
) -> nn.Module:
    """The HF classifier with `num_labels` outputs, its pad token set (and embeddings grown if the tokenizer gained
    one); with `quant`, its backbone's linear layers quantised by bitsandbytes (the value head is not). More than one
    label (attribute heads), or `fresh_head` (the trained head is loaded next), replaces a saved head of another size
    with a fresh one."""
    if quant and quant.bits == 8:
        # the same function object each time: logging adds a filter once however often models are loaded
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_int8_cast_notice)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=num_labels,
        dtype=dtype,
        attn_implementation=hf_attn_implementation(attn),
        **({"ignore_mismatched_sizes": True} if num_labels != 1 or fresh_head else {}),
        quantization_config=quantization_config(quant, dtype) if quant else None,
    )
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights in place for a CPU inference kernel at the first no-grad forward: that
        # would rewrite ZeRO-3's partitioned storage (and fails on layers narrower than its block)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def compile_blocks(classifier: nn.Module) -> int:
    """torch.compile the forward of every transformer block (the classes HF names in `_no_split_modules`), with
    dynamic lengths; returns how many. Each block is also made a ZeRO-3 leaf: DeepSpeed then gathers its weights
    in one hook around the block instead of hooks on every layer inside it, which the compiler cannot trace
    (each would split the block's graph). Blocks, not the whole model: the per-batch mask and gather code stays
    eager."""
    from deepspeed.utils import set_z3_leaf_module

    names = set(getattr(classifier, "_no_split_modules", None) or ())
    blocks = [m for m in classifier.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"model.compile: {type(classifier).__name__} names no transformer block class to compile")
    for block in blocks:
        set_z3_leaf_module(block, True)
        block.forward = torch.compile(block.forward, dynamic=True)
    return len(blocks)


def _full_numel(p: nn.Parameter) -> int:
    quant_state = getattr(p, "quant_state", None)  # bitsandbytes packs two 4-bit weights per byte
    if quant_state is not None:
        return quant_state.shape.numel()
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def parameter_counts(module: nn.Module, matmul_only: bool = False) -> tuple[int, int]:
    """(all, trainable) weights of `module`, counting ZeRO-3 partitioned and 4-bit packed weights at full size.
    `matmul_only`: only the weights of linear layers (adapters included), the ones that cost FLOPs per token."""
    if matmul_only:
        params = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    else:
        params = list(module.parameters())
    total = trainable = 0
    for p in params:
        n = _full_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def write_random_init(src: str, dest: str, seed: int, dtype: torch.dtype = torch.float32, num_labels: int = 1) -> None:
    """Random weights for the architecture at `src` with a `num_labels`-output head, saved (in `dtype`) with its
    tokenizer so `from_pretrained` can load them.

    Built outside DeepSpeed on one process, then loaded by every rank like any checkpoint: constructing from a
    config inside zero.Init does not work with transformers' weight init."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(src, num_labels=num_labels)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)


def check_model_path(path: str, max_length: int) -> None:
    """Before any work: model.path ("" is the built-in tiny model) is a local model directory whose positions cover
    data.max_length (beyond them a model with absolute positions crashes, one with rotary ones trains on garbage)."""
    if not path:
        return
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(
            f"model.path: {path} is not a directory: bigrm trains from a local model directory (fetch a hub "
            "model first, e.g. `hf download NAME --local-dir DIR`)"
        )
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path: {path} has no config.json: not a Hugging Face model directory")
    positions = json.loads((p / "config.json").read_text()).get("max_position_embeddings")
    if positions and max_length > positions:
        raise ConfigError(
            f"data.max_length: {max_length} is more than the {positions} positions of {p / 'config.json'} "
            "(max_position_embeddings): lower data.max_length"
        )
