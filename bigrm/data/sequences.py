"""Validated examples → scored token sequences.

The scored sequence of a completion, and so the token whose value is the reward, is set by the reward convention
(`data.reward_convention`), chosen to match how the RM's consumer tokenises what it scores:
  trl       text rows: `tokenizer(prompt + completion)` with the tokenizer's special tokens, then EOS unless it is
            already last (TRL RewardTrainer); chat rows: the chat template's rendering of the whole conversation
            as is, nothing added or appended (TRL RewardTrainer and GRPO, RewardBench, apply_chat_template(...,
            tokenize=True)). The default.
  grpo      text rows: `prompt + completion` with no special tokens added and nothing appended (TRL GRPO's
            reward-model path for text prompts); chat rows as `trl`.
  openrlhf  the text (chat rows: their rendering) with trailing newlines stripped, then " " + EOS unless it already
            ends in EOS, with no special tokens added (OpenRLHF's reward dataset).
The reward is the value head's output at that sequence's final token. Training, evaluation, scoring and export all
use this one definition (`render`, `encode_batch` and `fit` below); exports record the convention in their config.

Stepwise rows (a process reward model's) are laid out by data.step_layout instead: `trl` is TRL PRMTrainer's
tokenize_row (BOS when the tokenizer has one, the prompt and each step tokenised alone, each step followed by the
separator's ids, no EOS; a chat prompt is its rendering with the generation prompt, which holds the template's own
BOS), so each step ends at its separator's last id whatever BPE would merge across the boundary (`split_sequence`);
`joined` tokenises prompt + the joined solution by the reward convention and finds each step end in the token ends
(`step_positions`).

Over-long sequences: the prompt is cut from the left (leading special tokens such as BOS are kept) until the
sequence fits max_length; a completion that alone does not fit is an error or a counted skip (data.overlong).
Examples are tokenised many at once (bigrm.data.tokenise.scored_chunk), for training and scoring alike.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from bigrm.config import DataConfig
from bigrm.data.examples import Text
from bigrm.data.labels import Labels
from bigrm.errors import DataError


@dataclass(frozen=True)
class Group:
    """One prompt's K scored sequences, in its example's completion order, with its labels."""

    seqs: tuple[np.ndarray, ...]  # K arrays of token ids (int64, or views of a token_store.TokenStore's int32)
    source: str
    labels: Labels = Labels()
    steps: tuple[np.ndarray, ...] | None = None  # stepwise: per sequence, the index of each step's last token
    starts: tuple[int, ...] | None = None  # per sequence, the index of its first completion token (None: not known)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


@dataclass
class EncodeReport:
    groups: int = 0
    sequences: int = 0
    tokens: int = 0
    prompts_cut: int = 0
    prompt_tokens_cut: int = 0
    skipped: Counter = field(default_factory=Counter)

    def add(self, other: EncodeReport) -> None:
        """Counts `other`'s (another part of the same data's) too."""
        for name in ("groups", "sequences", "tokens", "prompts_cut", "prompt_tokens_cut"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped.update(other.skipped)

    def cut_summary(self) -> str:
        return f"{self.prompts_cut} sequences had their prompt cut from the left ({self.prompt_tokens_cut} tokens)"

    def summary(self) -> str:
        text = f"{self.groups} prompts, {self.sequences} sequences, {self.tokens} tokens; {self.cut_summary()}"
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{n} × {why}" for why, n in self.skipped.items())
        return text


def render(tokenizer, prompt: Text, completion: Text, heads: tuple[str, ...] | None = None) -> tuple[str, int]:
    """(full text, character offset where the completion starts); `heads` is prompt_heads(tokenizer, prompt) when
    the caller renders several completions of one chat prompt."""
    if isinstance(prompt, str):
        return prompt + completion, len(prompt)
    reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    heads = heads or prompt_heads(tokenizer, prompt)
    full = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    # The prompt part is the prompt's own rendering, with the assistant header when the reply starts with one;
    # if the template renders the prompt differently inside the whole conversation, only the shared text counts.
    for head in heads:
        if full.startswith(head):
            return full, len(head)
    n = 0
    while n < min(len(full), len(head)) and full[n] == head[n]:
        n += 1
    return full, n


def prompt_heads(tokenizer, prompt: list[dict]) -> tuple[str, str]:
    """A chat prompt's own renderings: with the generation prompt (assistant header), then without."""
    if tokenizer.chat_template is None:
        raise DataError("chat-message rows need a tokenizer with a chat template")
    return tuple(
        tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=generation_prompt)
        for generation_prompt in (True, False)
    )


class Encoded(NamedTuple):
    ids: list[int]  # the scored sequence: its last token carries the reward
    n_lead: int  # leading special tokens (BOS...), never cut
    prompt_end: int  # index of the first token that is not wholly prompt
    ends: list[int] | None  # character end of each token in the rendered text (EOS: the text's length); None
    # when encode_batch was asked not to read them (only steps and segments are located with them)


def encode_batch(
    tokenizer,
    texts: list[str],
    starts: list[int],
    chats: list[bool],
    convention: str = DataConfig.reward_convention,
    with_ends: bool = True,
) -> list[Encoded]:
    """Rendered texts (completions starting at characters `starts`) as the scored token sequences of `convention`,
    with one fast-tokenizer call per kind of text. Chat renderings already hold the template's special tokens, so
    they are never added again."""
    if convention == "openrlhf":
        eos_text = tokenizer.eos_token
        if eos_text is None:
            raise DataError("data.reward_convention=openrlhf needs a tokenizer with an EOS token")
        texts = [t.rstrip("\n") for t in texts]
        texts = [t if t.endswith(eos_text) else t + " " + eos_text for t in texts]
    special = set(tokenizer.all_special_ids)
    eos = tokenizer.eos_token_id
    out: list[Encoded | None] = [None] * len(texts)
    for chat in (False, True):
        todo = [i for i, c in enumerate(chats) if c == chat]
        if not todo:
            continue
        add_special = convention == "trl" and not chat
        for i, e in zip(todo, _tokenize(tokenizer, [texts[i] for i in todo], add_special), strict=True):
            ids = e.ids
            n_lead = 0
            while n_lead < len(ids) and ids[n_lead] in special:
                n_lead += 1
            # Prompt tokens end before the completion starts; a token straddling the boundary belongs to the
            # completion. Reading every token's offsets costs more than the tokenising they come from (a Python
            # tuple per token), so the token holding the completion's first character is asked for; only when
            # no token holds it (an empty completion, whitespace a tokenizer drops) are the offsets counted.
            first = e.char_to_token(starts[i]) if starts[i] < len(texts[i]) else None
            ends = [end for _, end in e.offsets] if with_ends or first is None else None
            prompt_end = first if first is not None else sum(1 for end in ends if end <= starts[i])
            if add_special and eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
                ends = ends + [len(texts[i])] if with_ends else None
            out[i] = Encoded(ids, n_lead, max(prompt_end, n_lead), ends if with_ends else None)
    return out


def _tokenize(tokenizer, texts: list[str], add_special: bool) -> list:
    """The fast tokenizer's `tokenizers.Encoding` of each text: straight from its backend when it would neither
    truncate nor pad (what `tokenizer(...)` then does too, without building a dict per text), else through it."""
    if not tokenizer.is_fast:
        raise DataError(f"bigrm needs a fast tokenizer (tokenizer.json); {type(tokenizer).__name__} is not one")
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        return backend.encode_batch(texts, add_special_tokens=add_special)
    return tokenizer(texts, add_special_tokens=add_special).encodings


def truncate(ids: list[int], n_lead: int, prompt_end: int, max_length: int) -> tuple[list[int], int] | None:
    """Cut prompt tokens from the left, after the leading specials; None if the completion alone is too long."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, 0
    if excess > prompt_end - n_lead:
        return None
    return ids[:n_lead] + ids[n_lead + excess :], excess


class Scored(NamedTuple):
    """A completion's scored sequence, with what scoring parts of it needs."""

    ids: list[int]
    completion_start: int  # index of the first completion token
    cut: int  # prompt tokens cut from the left
    ends: list[int] | None  # character end of each token in `text` (None: Encoded's were not read)
    text: str  # the rendered prompt + completion ("" when laid out from ids: the trl step layout)
    char_start: int  # where the completion starts in `text`
    steps: np.ndarray | str | None = None  # stepwise: each step's last token index (step_positions), or why none


def fit(enc: Encoded, text: str, start: int, max_length: int) -> Scored | int:
    """An encoded completion (rendered as `text`, from character `start`) cut to max_length, or the completion's
    token count when it alone exceeds max_length."""
    fitted = truncate(enc.ids, enc.n_lead, enc.prompt_end, max_length)
    if fitted is None:
        return len(enc.ids) - enc.prompt_end + enc.n_lead
    ids, cut = fitted
    ends = enc.ends[: enc.n_lead] + enc.ends[enc.n_lead + cut :] if enc.ends is not None and cut else enc.ends
    return Scored(ids, enc.prompt_end - cut, cut, ends, text, start)


def scored_sequence(
    tokenizer, prompt: Text, completion: Text, max_length: int, convention: str = DataConfig.reward_convention
) -> Scored | int:
    """One completion's scored sequence, token ends read (or its token count when it alone exceeds max_length):
    what scored_chunk gives for it, tokenised alone."""
    text, start = render(tokenizer, prompt, completion)
    enc = encode_batch(tokenizer, [text], [start], [isinstance(prompt, list)], convention)[0]
    return fit(enc, text, start, max_length)


def split_sequence(
    tokenizer, prompt: Text, prompt_ids: list[int], step_ids: list[list[int]], separator_ids: list[int], max_length: int
) -> Scored | int:
    """A stepwise solution in the `trl` step layout, from its prompt's ids (no special tokens added) and each step's,
    cut to max_length, with its step ends; or the solution's token count when it alone exceeds max_length."""
    lead = [tokenizer.bos_token_id] if isinstance(prompt, str) and tokenizer.bos_token_id is not None else []
    special = set(tokenizer.all_special_ids)
    ids = lead + prompt_ids
    n_lead = next((i for i, t in enumerate(ids) if t not in special), len(ids))
    prompt_end = len(ids)
    ends = []
    for step in step_ids:
        ids += step + separator_ids
        ends.append(len(ids) - 1)
    seq = fit(Encoded(ids, n_lead, prompt_end, None), "", 0, max_length)
    if isinstance(seq, int):
        return seq
    return seq._replace(steps=np.asarray(ends, dtype=np.int64) - seq.cut)


def step_positions(seq: Scored, completion: str, step_ends: tuple[int, ...], convention: str) -> np.ndarray | str:
    """Where each step of a stepwise completion ends in its scored sequence (read with token ends): the token whose
    text ends exactly at the step's end (its separator's last token), or why there is none."""
    if convention == "openrlhf":
        return "stepwise rows need data.reward_convention trl or grpo (openrlhf strips the final separator)"
    base = seq.text.find(completion, seq.char_start)  # chat templates render the completion somewhere after the prompt
    if base < 0:
        return "the chat template changes the completion's text, so its steps cannot be found in the rendering"
    out, ends = [], seq.ends
    for k, end in enumerate(step_ends):
        i = bisect.bisect_left(ends, base + end)  # the first token ending there: an appended EOS ends there too
        if i < seq.completion_start or i == len(ends) or ends[i] != base + end or (out and i <= out[-1]):
            return (
                f"step {k} does not end at a token boundary (the tokenizer merges data.step_separator with the "
                "text around it); choose a separator it keeps apart"
            )
        out.append(i)
    return np.asarray(out, dtype=np.int64)


@dataclass
class Tokenized:
    """Examples' scored sequences laid flat: what a token store is built from."""

    tokens: np.ndarray  # (T,) uint32, every kept sequence end to end
    lengths: np.ndarray  # (S,) int64, tokens of each kept sequence
    starts: np.ndarray  # (S,) int64, index of each kept sequence's first completion token (Scored.completion_start)
    kept: np.ndarray  # (G,) int64, index among the inputs of each kept example, whose K sequences are consecutive
    report: EncodeReport
    overlong: list[str]  # "source: completion k: n tokens" of each example with a completion that cannot fit
    # stepwise: per kept sequence its number of steps (0 for others), and every step's end token index, end to end
    step_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    step_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    step_errors: list[str] = field(default_factory=list)  # "source: completion k: reason"
