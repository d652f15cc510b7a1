"""Validated examples → scored token sequences (bigrm.data.sequences), with the local tiny tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import processors

from bigrm.builtin.tiny import build_tokenizer
from bigrm.data.examples import Example
from bigrm.data.labels import Labels
from bigrm.data.sequences import Encoded, EncodeReport, Scored, encode_batch, fit, render, scored_sequence, truncate
from bigrm.data.tokenise import scored_chunk, tokenize_examples
from bigrm.errors import DataError

SOURCE = "train.jsonl:line 7"
LONG_PROMPT = "\n\nHuman: " + "tell me about the weather and the sea " * 8 + "\n\nAssistant:"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def with_bos(tokenizer):
    """The tiny tokenizer, but adding BOS in front of every encoding (like Llama's)."""
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id
    return tokenizer


def ids_of(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode(tokenizer, text: str, start: int, chat: bool):
    """One rendered text's Encoded, token ends read."""
    return encode_batch(tokenizer, [text], [start], [chat])[0]


def example(prompt, *completions, margin: float = 0.0, source: str = SOURCE) -> Example:
    return Example(prompt, tuple(completions), source, Labels(margin=margin))


def msgs(*pairs: str) -> list[dict]:
    return [{"role": r, "content": c} for r, c in zip(pairs[::2], pairs[1::2], strict=True)]


def seqs(groups) -> list[list[list[int]]]:
    return [[s.tolist() for s in g.seqs] for g in groups]


# ---------------------------------------------------------------------------------------------------- plain text


def test_tiny_tokenizer_is_what_these_tests_assume(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert tok.bos_token_id not in ids_of(tok, "plain text")  # adds no special tokens by itself


def test_render_plain_text(tok):
    assert render(tok, "Q: why?", " Because.") == ("Q: why? Because.", 7)
    assert render(tok, "", "x") == ("x", 0)


def test_plain_sequence_is_tokenizer_ids_plus_eos(tok):
    examples = [
        example("\n\nHuman: Hi\n\nAssistant:", " Hello there", " Go away", margin=0.5, source="a.jsonl:line 1"),
        example("Q: café ☕ or tea?", " café", " tea 🍵", " neither", source="b.parquet:row 3"),
        example("The sky is ", "blue", "green", "red", "purple", source="c.json:row 0"),
    ]
    groups, report = tokenize_examples(examples, tok, max_length=1024, overlong="error")
    eos = tok.eos_token_id
    expected = [[ids_of(tok, ex.prompt + c) + [eos] for c in ex.completions] for ex in examples]
    assert seqs(groups) == expected
    for group, ex in zip(groups, examples, strict=True):
        assert all(s.dtype == np.int64 for s in group.seqs)
        assert (group.labels.margin, group.source) == (ex.labels.margin, ex.source)
        assert group.num_tokens == sum(len(s) for s in group.seqs)
    assert (report.groups, report.sequences) == (3, 9)
    assert report.tokens == sum(len(s) for g in expected for s in g)
    assert (report.prompts_cut, report.prompt_tokens_cut, report.skipped) == (0, 0, {})


@pytest.mark.parametrize("completion", [" done</s>", " done.</s>", "</s>"])
def test_eos_is_not_doubled_when_the_text_already_ends_with_it(tok, completion):
    prompt = "Say done:"
    (group,), _ = tokenize_examples([example(prompt, completion, " nope")], tok, 1024, "error")
    first = group.seqs[0].tolist()
    assert first == ids_of(tok, prompt + completion)
    assert first[-1] == tok.eos_token_id and first[-2] != tok.eos_token_id
    assert group.seqs[1].tolist() == ids_of(tok, prompt + " nope") + [tok.eos_token_id]


def test_eos_is_appended_after_trailing_text(tok):
    ids, _, _, _ = encode(tok, "a</s> b", 1, chat=False)
    assert ids == ids_of(tok, "a</s> b") + [tok.eos_token_id]
    assert ids.count(tok.eos_token_id) == 2


def test_encode_reports_prompt_boundary(tok):
    prompt, completion = "\n\nHuman: Hi\n\nAssistant:", " Hello"
    text, start = render(tok, prompt, completion)
    ids, n_lead, prompt_end, _ = encode(tok, text, start, chat=False)
    assert ids_of(tok, prompt) + ids_of(tok, completion) == ids_of(tok, text)  # the split is clean here
    assert (n_lead, prompt_end) == (0, len(ids_of(tok, prompt)))
    assert ids[prompt_end:] == ids_of(tok, completion) + [tok.eos_token_id]


def test_token_straddling_the_boundary_belongs_to_the_completion(tok):
    # "he" + "llo" tokenises as h | el | lo: "el" straddles the boundary and counts as completion
    assert tok.convert_ids_to_tokens(ids_of(tok, "hello")) == ["h", "el", "lo"]
    ids, n_lead, prompt_end, _ = encode(tok, "hello", 2, chat=False)
    assert (n_lead, prompt_end) == (0, 1)
    groups, report = tokenize_examples([example("he", "llo", "!")], tok, max_length=3, overlong="error")
    eos = tok.eos_token_id
    assert seqs(groups)[0] == [ids_of(tok, "hello")[1:] + [eos], ids_of(tok, "he!")[1:] + [eos]]
    assert (report.prompts_cut, report.prompt_tokens_cut) == (2, 2)  # only "h" could be cut from "hello"
    with pytest.raises(DataError, match="completion 0: 3 tokens"):
        tokenize_examples([example("he", "llo", "!")], tok, max_length=2, overlong="error")


# ---------------------------------------------------------------------------------------------------- chat


def test_chat_prompt_uses_the_chat_template(tok):
    prompt = msgs("system", "Be kind.", "user", "hello there")
    text, start = render(tok, prompt, "hi")
    assert text == tok.apply_chat_template(prompt + msgs("assistant", "hi"), tokenize=False)
    assert text == "<|system|>\nBe kind.</s>\n<|user|>\nhello there</s>\n<|assistant|>\nhi</s>\n"
    assert text[:start] == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert text[start:] == "hi</s>\n"

    (group,), _ = tokenize_examples([example(prompt, "hi", "go away")], tok, 1024, "error")
    for seq, completion in zip(group.seqs, ["hi", "go away"], strict=True):
        rendered = tok.apply_chat_template(prompt + msgs("assistant", completion), tokenize=False)
        # the template ends in "</s>\n": the reward is read at that newline, where the rendering ends
        assert seq.tolist() == ids_of(tok, rendered, special=False)
        assert seq[-1] != tok.eos_token_id


def test_chat_rendering_is_tokenised_without_adding_special_tokens_again():
    tok = with_bos(build_tokenizer())
    prompt = msgs("user", "hello there")
    plain, chat = tokenize_examples(
        [example("hello there", " hi", " no"), example(prompt, "hi", "no")], tok, 1024, "error"
    )[0]
    assert plain.seqs[0].tolist() == ids_of(tok, "hello there hi") + [tok.eos_token_id]
    assert plain.seqs[0][0] == tok.bos_token_id
    rendered = tok.apply_chat_template(prompt + msgs("assistant", "hi"), tokenize=False)
    assert chat.seqs[0].tolist() == ids_of(tok, rendered, special=False)
    assert tok.bos_token_id not in chat.seqs[0].tolist()


def test_chat_rendering_that_ends_in_eos_gets_no_second_eos():
    tok = build_tokenizer()
    tok.chat_template = tok.chat_template.replace("</s>\n", "</s>")
    prompt = msgs("user", "hello")
    (group,), _ = tokenize_examples([example(prompt, "hi", "no")], tok, 1024, "error")
    rendered = tok.apply_chat_template(prompt + msgs("assistant", "hi"), tokenize=False)
    assert rendered.endswith("hi</s>")
    seq = group.seqs[0].tolist()
    assert seq == ids_of(tok, rendered, special=False)
    assert seq[-1] == tok.eos_token_id and seq[-2] != tok.eos_token_id


def test_chat_message_list_completions(tok):
    prompt = msgs("user", "Tell me a joke")
    chosen, rejected = msgs("assistant", "Knock knock."), msgs("assistant", "No.")
    text, start = render(tok, prompt, chosen)
    assert text == tok.apply_chat_template(prompt + chosen, tokenize=False)
    assert text[start:] == "Knock knock.</s>\n"
    (group,), _ = tokenize_examples([example(prompt, chosen, rejected)], tok, 1024, "error")
    assert group.seqs[1].tolist() == ids_of(
        tok, tok.apply_chat_template(prompt + rejected, tokenize=False), special=False
    )


def test_chat_rows_need_a_chat_template():
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        tokenize_examples([example(msgs("user", "q"), "a", "b")], tok, 1024, "error")
    # plain text rows do not need one
    groups, _ = tokenize_examples([example("q", " a", " b")], tok, 1024, "error")
    assert len(groups) == 1


# ---------------------------------------------------------------------------------------------------- truncation


def test_truncate_cuts_the_prompt_after_leading_specials():
    ids = [1, 10, 11, 12, 13, 20, 21, 2]  # BOS, 4 prompt tokens, 2 completion tokens, EOS
    assert truncate(ids, 1, 5, 8) == (ids, 0)
    assert truncate(ids, 1, 5, 100) == (ids, 0)
    assert truncate(ids, 1, 5, 6) == ([1, 12, 13, 20, 21, 2], 2)
    assert truncate(ids, 1, 5, 4) == ([1, 20, 21, 2], 4)
    assert truncate(ids, 1, 5, 3) is None
    assert truncate(ids, 0, 5, 3) == ([20, 21, 2], 5)
    assert truncate(ids, 0, 5, 2) is None


def test_fit_keeps_the_ends_of_the_tokens_it_keeps():
    ids, ends = [1, 10, 11, 12, 13, 20, 21, 2], [0, 2, 4, 6, 8, 10, 12, 12]  # BOS, prompt, completion, EOS
    enc = Encoded(ids, 1, 5, ends)
    assert fit(enc, "text", 8, 100) == Scored(ids, 5, 0, ends, "text", 8)
    assert fit(enc, "text", 8, 6) == Scored([1, 12, 13, 20, 21, 2], 3, 2, [0, 6, 8, 10, 12, 12], "text", 8)
    assert fit(enc._replace(ends=None), "text", 8, 6).ends is None
    assert fit(enc, "text", 8, 3) == 4  # BOS and the completion's 3 tokens do not fit in 3


def test_scored_chunk_is_each_completion_scored_alone(tok):
    """One batch for every completion of every example, plain and chat: what scoring each alone gives, token ends
    read only when asked for."""
    examples = [
        example(LONG_PROMPT, " Yes.", " No, the weather is bad"),
        example(msgs("user", "hello"), "hi there", " hey"),
        example("q", " the weather is fine" * 3, " ok"),
    ]
    alone = [[scored_sequence(tok, e.prompt, c, 20) for c in e.completions] for e in examples]
    assert any(s.cut for s in alone[0]) and isinstance(alone[2][0], int)  # a cut prompt, a completion too long
    assert scored_chunk(examples, tok, 20, "trl", with_ends=True) == alone
    lean = [[s if isinstance(s, int) else s._replace(ends=None) for s in seqs] for seqs in alone]
    assert scored_chunk(examples, tok, 20, "trl") == lean


def test_steps_are_found_in_the_cut_sequence(tok):
    """A stepwise completion's step ends index its scored sequence, whether or not its prompt was cut."""
    completion = " the weather is fine\n the sea is calm\n"
    step_ends = (len(" the weather is fine\n"), len(completion))
    ex = Example(LONG_PROMPT, (completion,), SOURCE, step_ends=(step_ends,))
    ((whole,),) = scored_chunk([ex], tok, 1024, "trl")
    fits = len(whole.ids) - whole.completion_start + 3
    ((cut,),) = scored_chunk([ex], tok, fits, "trl")
    assert cut.cut > 0 and len(cut.ids) == fits
    assert cut.steps.tolist() == (whole.steps - cut.cut).tolist()
    assert [tok.decode([cut.ids[i]]) for i in cut.steps] == ["\n", "\n"]
    ((bad,),) = scored_chunk([ex], tok, 1024, "openrlhf")
    assert "need data.reward_convention trl or grpo" in bad.steps


def test_long_prompt_is_cut_from_the_left(tok):
    eos = tok.eos_token_id
    p_ids = ids_of(tok, LONG_PROMPT)
    completions = (" Sure, it is sunny.", " No.", " The sea is calm and the weather is fine.")
    c_ids = [ids_of(tok, c) for c in completions]
    for c, ci in zip(completions, c_ids, strict=True):
        assert ids_of(tok, LONG_PROMPT + c) == p_ids + ci  # clean split: the reference below is exact
    max_length = 30
    assert len(p_ids) > max_length
    short = example("Hi\n\nAssistant:", " Hello", " Bye", source="short")
    groups, report = tokenize_examples([short, example(LONG_PROMPT, *completions)], tok, max_length, "error")
    assert seqs(groups)[0] == [ids_of(tok, short.prompt + c) + [eos] for c in short.completions]
    cut_group = seqs(groups)[1]
    cuts = []
    for seq, ci in zip(cut_group, c_ids, strict=True):
        keep = max_length - len(ci) - 1
        assert seq == p_ids[len(p_ids) - keep :] + ci + [eos]  # completion and EOS intact, prompt tail kept
        assert len(seq) == max_length
        cuts.append(len(p_ids) - keep)
    assert report.prompts_cut == 3
    assert report.prompt_tokens_cut == sum(cuts)
    assert report.tokens == sum(len(s) for g in seqs(groups) for s in g)
    assert "3 sequences had their prompt cut from the left" in report.summary()


def test_leading_bos_in_the_prompt_text_is_kept(tok):
    prompt = "<s>" + LONG_PROMPT
    p_ids = ids_of(tok, prompt)
    assert p_ids[0] == tok.bos_token_id and p_ids[1:] == ids_of(tok, LONG_PROMPT)
    text, start = render(tok, prompt, " Yes.")
    ids, n_lead, prompt_end, _ = encode(tok, text, start, chat=False)
    assert (n_lead, prompt_end) == (1, len(p_ids))
    c_ids = ids_of(tok, " Yes.")
    (group,), report = tokenize_examples([example(prompt, " Yes.", " No.")], tok, 20, "error")
    seq = group.seqs[0].tolist()
    keep = 20 - 1 - len(c_ids) - 1
    assert seq == [tok.bos_token_id] + p_ids[len(p_ids) - keep :] + c_ids + [tok.eos_token_id]
    assert report.prompts_cut == 2
    assert report.prompt_tokens_cut == (len(p_ids) - 1 - keep) + (len(p_ids) - 1 - (20 - 2 - len(ids_of(tok, " No."))))


def test_bos_added_by_the_tokenizer_is_kept():
    tok = with_bos(build_tokenizer())
    (group,), report = tokenize_examples([example(LONG_PROMPT, " Yes.", " No.")], tok, 12, "error")
    body = ids_of(tok, LONG_PROMPT + " Yes.", special=False)
    assert group.seqs[0].tolist() == [tok.bos_token_id] + body[-10:] + [tok.eos_token_id]
    assert report.prompts_cut == 2


def test_completion_that_exactly_fits_once_the_whole_prompt_is_cut(tok):
    c_ids = ids_of(tok, " The sea is calm")
    fits = len(c_ids) + 1
    (group,), report = tokenize_examples([example(LONG_PROMPT, " The sea is calm", " ok")], tok, fits, "error")
    assert group.seqs[0].tolist() == c_ids + [tok.eos_token_id]
    n_prompt, n_ok = len(ids_of(tok, LONG_PROMPT)), len(ids_of(tok, " ok"))
    assert report.prompt_tokens_cut == n_prompt + (n_prompt - (fits - n_ok - 1))
    with pytest.raises(DataError, match=f"completion 0: {fits} tokens"):
        tokenize_examples([example(LONG_PROMPT, " The sea is calm", " ok")], tok, fits - 1, "error")


def test_overlong_completion_is_an_error_naming_the_row(tok):
    long_answer = " the weather is fine" * 20
    n = len(ids_of(tok, long_answer)) + 1
    rows = [
        example("Q:", " short", " also short", source="ok.jsonl:line 1"),
        example("Q:", " short", long_answer, source="data/train.jsonl:line 42"),
        example("Q:", long_answer, " x", long_answer + " and more", source="data/train.parquet:row 9"),
    ]
    with pytest.raises(DataError) as info:
        tokenize_examples(rows, tok, max_length=40, overlong="error")
    lines = str(info.value).split("\n")
    assert lines[0].startswith("2 row(s) have a completion that cannot fit")
    assert lines[1:] == [
        f"  data/train.jsonl:line 42: completion 1: {n} tokens, completion alone longer than data.max_length=40",
        f"  data/train.parquet:row 9: completion 0: {n} tokens, completion alone longer than data.max_length=40",
    ]


def test_overlong_completion_is_a_counted_skip(tok):
    long_answer = " the weather is fine" * 20
    rows = [
        example("Q:", " short", " also short", source="ok"),
        example("Q:", " short", long_answer, source="bad1"),
        example("Q:", " a", " b", " c", source="ok2"),
        example("Q:", long_answer, " x", source="bad2"),
    ]
    groups, report = tokenize_examples(rows, tok, max_length=40, overlong="skip")
    assert [g.source for g in groups] == ["ok", "ok2"]
    assert report.skipped == {"completion alone longer than data.max_length=40": 2}
    assert (report.groups, report.sequences) == (2, 5)
    assert report.tokens == sum(g.num_tokens for g in groups)
    assert report.summary().endswith("skipped: 2 × completion alone longer than data.max_length=40")


def test_empty_input(tok):
    groups, report = tokenize_examples([], tok, 16, "error")
    assert groups == [] and report == EncodeReport()


# ---------------------------------------------------------------------------------------------------- tokenizer checks


def test_tokenizer_whose_pad_is_eos_is_rejected():
    tok = build_tokenizer()
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    with pytest.raises(DataError, match="pad token equals its EOS token"):
        tokenize_examples([example("q", " a", " b")], tok, 1024, "error")
    with pytest.raises(DataError, match="pad token equals its EOS token"):
        tokenize_examples([], tok, 1024, "error")


# ----------------------------------------------------------------------------------------------- edge cases


def test_skipped_groups_add_no_cut_tokens(tok):
    long_answer = " the weather is fine" * 20
    # completion 0 fits once the prompt is cut; completion 1 cannot fit: the whole group is skipped
    _, report = tokenize_examples([example(LONG_PROMPT, " Yes.", long_answer)], tok, 40, "skip")
    assert sum(report.skipped.values()) == 1 and report.prompts_cut == 0
    assert report.prompt_tokens_cut == 0


def test_multi_turn_chat_completion_is_never_cut(tok):
    prompt = msgs("user", "hello", "assistant", "hi there")
    completion = msgs("user", "more please", "assistant", "sure")
    text, start = render(tok, prompt, completion)
    ids, n_lead, prompt_end, _ = encode(tok, text, start, chat=True)
    n_completion = len(ids_of(tok, tok.apply_chat_template(completion, tokenize=False), special=False))
    fitted = truncate(ids, n_lead, prompt_end, n_completion - 1)
    assert fitted is None  # the completion alone does not fit: it must not lose its first tokens


# ---------------------------------------------------------------------------------------------------- conventions


def text_and_chat(convention: str, reply: str = " hi"):
    """The scored sequences of one text row and one chat row under `convention` (a BOS-adding tokenizer), and the
    chat row's rendering."""
    tok = with_bos(build_tokenizer())
    prompt = msgs("user", "hello there")
    rows = [example("hello there", reply, " no"), example(prompt, "hi", "no")]
    plain, chat = tokenize_examples(rows, tok, 1024, "error", convention)[0]
    return tok, plain, chat, tok.apply_chat_template(prompt + msgs("assistant", "hi"), tokenize=False)


def test_grpo_convention_scores_text_as_is_and_chat_as_rendered():
    tok, plain, chat, rendered = text_and_chat("grpo")
    # TRL GRPO tokenises prompt + completion with add_special_tokens=False and appends nothing
    assert plain.seqs[0].tolist() == ids_of(tok, "hello there hi", special=False)
    assert chat.seqs[0].tolist() == ids_of(tok, rendered, special=False)


def test_openrlhf_convention_strips_newlines_and_appends_spaced_eos():
    tok, plain, chat, rendered = text_and_chat("openrlhf", reply=" hi\n\n")
    # OpenRLHF's reward dataset: (prompt + reply).rstrip("\n") + " " + EOS, add_special_tokens=False
    assert plain.seqs[0].tolist() == ids_of(tok, "hello there hi </s>", special=False)
    assert plain.seqs[1].tolist() == ids_of(tok, "hello there no </s>", special=False)
    assert rendered.endswith("</s>\n")  # stripped, it already ends in EOS: nothing appended
    assert chat.seqs[0].tolist() == ids_of(tok, rendered.rstrip("\n"), special=False)


def test_openrlhf_convention_needs_an_eos_token():
    tok = build_tokenizer()
    tok.eos_token = None
    with pytest.raises(DataError, match="openrlhf needs a tokenizer with an EOS"):
        tokenize_examples([example("q", " a", " b")], tok, 1024, "error", "openrlhf")


@pytest.mark.parametrize("convention", ["trl", "grpo", "openrlhf"])
def test_every_convention_keeps_the_prompt_boundary_and_cuts_prompts_only(convention):
    tok = with_bos(build_tokenizer())
    (full,), _ = tokenize_examples([example(LONG_PROMPT, " yes", " no")], tok, 1024, "error", convention)
    n = len(full.seqs[0])
    (cut,), report = tokenize_examples([example(LONG_PROMPT, " yes", " no")], tok, n - 5, "error", convention)
    assert cut.seqs[0].tolist()[-6:] == full.seqs[0].tolist()[-6:]  # the completion's end is never cut
    assert len(cut.seqs[0]) == n - 5 and report.prompt_tokens_cut >= 5


def test_worker_processes_end_quietly_under_the_trainers_signal_handlers():
    """Training installs SIGTERM/SIGINT handlers that raise; the tokenising pool's workers must not inherit them, or
    the SIGTERM that ends the pool raises in a worker and the parent can wait for ever."""
    import subprocess
    import sys

    script = """
from bigrm.training import preemption
from bigrm.data.examples import Example
from bigrm.data.tokenise import CHUNK, encode_examples
from bigrm.builtin.tiny import build_tokenizer
preemption.terminate_on_signals()
examples = [Example(f"p{i}", ("good", "bad"), "s") for i in range(4 * CHUNK)]
for _ in range(5):
    encode_examples(examples, build_tokenizer(), 64, "error", num_proc=2)
print("done")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
    assert "Terminated" not in proc.stderr


def test_a_killed_worker_process_is_one_line_not_a_wait_for_ever():
    """A multiprocessing.Pool whose worker is killed (SIGKILL, the out-of-memory killer) waits for its task for
    ever: the build hung."""
    import subprocess
    import sys

    script = """
import os, signal
from bigrm.data import tokenise
from bigrm.data.examples import Example
from bigrm.builtin.tiny import build_tokenizer
from bigrm.errors import ProcessDied
real = tokenise.tokenize_chunk
def chunk(examples, *args):
    if examples[0].prompt == f"p{tokenise.CHUNK}":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(examples, *args)
tokenise.tokenize_chunk = chunk
examples = [Example(f"p{i}", ("good", "bad"), "s") for i in range(4 * tokenise.CHUNK)]
try:
    tokenise.encode_examples(examples, build_tokenizer(), 64, "error", num_proc=2)
except ProcessDied as err:
    print(err)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "a tokenising worker process was killed (by a signal, or out of memory?)\n", proc.stderr
