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
use this one definition (`render` and `encode` below); exports record the convention in their config.

Over-long sequences: the prompt is cut from the left (leading special tokens such as BOS are kept) until the
sequence fits max_length; a completion that alone does not fit is an error or a counted skip (data.overlong).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from bigrm.config import DataConfig
from bigrm.data import DataError, Example, Labels, Text, listed


@dataclass(frozen=True)
class Group:
    """One prompt's K scored sequences, in its example's completion order, with its labels."""

    seqs: tuple[np.ndarray, ...]  # K int64 arrays of token ids
    source: str
    labels: Labels = Labels()

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

    def cut_summary(self) -> str:
        return f"{self.prompts_cut} sequences had their prompt cut from the left ({self.prompt_tokens_cut} tokens)"

    def summary(self) -> str:
        text = f"{self.groups} prompts, {self.sequences} sequences, {self.tokens} tokens; {self.cut_summary()}"
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{n} × {why}" for why, n in self.skipped.items())
        return text


def render(tokenizer, prompt: Text, completion: Text) -> tuple[str, int]:
    """(full text, character offset where the completion starts)."""
    if isinstance(prompt, str):
        return prompt + completion, len(prompt)
    if tokenizer.chat_template is None:
        raise DataError("chat-message rows need a tokenizer with a chat template")
    reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    full = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    # The prompt part is the prompt's own rendering, with the assistant header when the reply starts with one;
    # if the template renders the prompt differently inside the whole conversation, only the shared text counts.
    for generation_prompt in (True, False):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=generation_prompt)
        if full.startswith(head):
            return full, len(head)
    n = 0
    while n < min(len(full), len(head)) and full[n] == head[n]:
        n += 1
    return full, n


class Encoded(NamedTuple):
    ids: list[int]  # the scored sequence: its last token carries the reward
    n_lead: int  # leading special tokens (BOS...), never cut
    prompt_end: int  # index of the first token that is not wholly prompt
    ends: list[int]  # character end of each token in the rendered text (EOS: the text's length)


def encode(tokenizer, text: str, start: int, chat: bool, convention: str = DataConfig.reward_convention) -> Encoded:
    """One rendered text (completion starting at character `start`) as the scored token sequence of `convention`.

    Chat renderings already hold the template's special tokens, so they are never added again."""
    add_special = convention == "trl" and not chat
    if convention == "openrlhf":
        if tokenizer.eos_token is None:
            raise DataError("data.reward_convention=openrlhf needs a tokenizer with an EOS token")
        text = text.rstrip("\n")
        if not text.endswith(tokenizer.eos_token):
            text += " " + tokenizer.eos_token
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    n_lead = 0
    while n_lead < len(ids) and ids[n_lead] in special:
        n_lead += 1
    # Prompt tokens end before the completion starts; a token straddling the boundary belongs to the completion.
    prompt_end = sum(1 for s, e in offsets if e <= start)
    ends = [e for _, e in offsets]
    eos = tokenizer.eos_token_id
    if add_special and eos is not None and (not ids or ids[-1] != eos):
        ids, ends = ids + [eos], ends + [len(text)]
    return Encoded(ids, n_lead, max(prompt_end, n_lead), ends)


def truncate(ids: list[int], n_lead: int, prompt_end: int, max_length: int) -> tuple[list[int], int] | None:
    """Cut prompt tokens from the left, after the leading specials; None if the completion alone is too long."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, 0
    if excess > prompt_end - n_lead:
        return None
    return ids[:n_lead] + ids[n_lead + excess :], excess


@dataclass(frozen=True)
class Scored:
    """A completion's scored sequence, with what scoring parts of it needs."""

    ids: list[int]
    completion_start: int  # index of the first completion token
    cut: int  # prompt tokens cut from the left
    ends: list[int]  # character end of each token in `text`
    text: str  # the rendered prompt + completion
    char_start: int  # where the completion starts in `text`


def scored_sequence(
    tokenizer, prompt: Text, completion: Text, max_length: int, convention: str = DataConfig.reward_convention
) -> Scored | int:
    """The scored sequence, or the completion's token count when it alone exceeds max_length."""
    text, start = render(tokenizer, prompt, completion)
    enc = encode(tokenizer, text, start, chat=isinstance(prompt, list), convention=convention)
    fitted = truncate(enc.ids, enc.n_lead, enc.prompt_end, max_length)
    if fitted is None:
        return len(enc.ids) - enc.prompt_end + enc.n_lead
    ids, cut = fitted
    ends = enc.ends[: enc.n_lead] + enc.ends[enc.n_lead + cut :]
    return Scored(ids, enc.prompt_end - cut, cut, ends, text, start)


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    max_length: int,
    overlong: str,
    convention: str = DataConfig.reward_convention,
    max_errors: int = DataConfig.max_errors,
) -> tuple[list[Group], EncodeReport]:
    if tokenizer.eos_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise DataError("the tokenizer's pad token equals its EOS token; bigrm.model.prepare_tokenizer fixes that")
    report, groups, errors = EncodeReport(), [], []
    for ex in examples:
        seqs, cut, cut_tokens, bad = [], 0, 0, None
        for k, completion in enumerate(ex.completions):
            scored = scored_sequence(tokenizer, ex.prompt, completion, max_length, convention)
            if isinstance(scored, int):
                bad = bad or (k, scored)
                continue
            seqs.append(np.asarray(scored.ids, dtype=np.int64))
            cut += scored.cut > 0
            cut_tokens += scored.cut
        if bad is not None:
            reason = f"completion alone longer than data.max_length={max_length}"
            if overlong == "error":
                errors.append(f"{ex.source}: completion {bad[0]}: {bad[1]} tokens, {reason}")
            report.skipped[reason] += 1
            continue
        report.prompts_cut += cut
        report.prompt_tokens_cut += cut_tokens
        groups.append(Group(tuple(seqs), ex.source, ex.labels))
    if errors:
        raise DataError(
            f"{len(errors)} row(s) have a completion that cannot fit (set data.overlong: skip to drop them, or raise "
            f"data.max_length):{listed(errors, max_errors)}"
        )
    report.groups = len(groups)
    report.sequences = sum(len(g.seqs) for g in groups)
    report.tokens = sum(g.num_tokens for g in groups)
    return groups, report
