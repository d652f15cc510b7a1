"""The built-in tiny models: a shipped architecture config plus a byte-level BPE tokenizer built here, offline."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from bigrm.builtin.synthetic import WORDS

ASSETS = Path(__file__).parent / "assets"
ARCHS = {"llama": ASSETS / "tiny-llama.json", "gpt_neox": ASSETS / "tiny-gpt-neox.json"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) whose merges make every synthetic-task word a single token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(WORDS)] * 50 + [f" {w}" for w in WORDS] * 50 + ["Human: Assistant: user assistant"] * 50
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )


def write_tiny(dest: str | Path, arch: str = "llama") -> Path:
    """A model directory with config and tokenizer but no weights (load it with model.random_init)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = json.loads(ARCHS[arch].read_text())
    if len(tokenizer) > config["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but {ARCHS[arch].name} only {config['vocab_size']}")
    config.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(dest)
    return dest
