"""The tokenizer of a run: model.path's, or the built-in tiny model's, with a pad token distinct from EOS (and the
step token of a process reward model)."""

from __future__ import annotations

from pathlib import Path

from bigrm.builtin import tiny
from bigrm.errors import DataError


def load_tokenizer(model_path: str, out: Path):
    """model.path's tokenizer, or (empty path) the built-in tiny model's, written into `out` when missing."""
    from transformers import AutoTokenizer

    path = model_path
    if not path:
        path = out / "tiny-llama"
        if not (path / "tokenizer_config.json").exists():
            tiny.write_tiny(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    return tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Give the tokenizer a pad token distinct from EOS (HF classifiers score the last non-pad token): the unknown
    token when there is one, else a new token (load_classifier then grows the embeddings if needed)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return
    tokenizer.add_special_tokens({"pad_token": "<|bigrm_pad|>"})


def add_step_token(tokenizer, token: str) -> None:
    """data.step_token as an added special token of the tokenizer (when missing: load_classifier then grows the
    embeddings): one id that no merge takes apart or joins to the text around it."""
    if token and token not in tokenizer.get_added_vocab():
        tokenizer.add_tokens([token], special_tokens=True)


def check_step_token(tokenizer, token: str) -> None:
    """A model scores data.step_token's rows only when its tokenizer holds that token as one added id."""
    if token and token not in tokenizer.get_added_vocab():
        raise DataError(f"data.step_token={token!r} is not a special token of the model's tokenizer")
