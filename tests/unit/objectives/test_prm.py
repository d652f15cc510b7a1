"""Process reward models: stepwise rows through tokenisation, the token store and packing, read at every step end
exactly as a plain transformers forward of each sequence alone; the token-classifier export; 2-rank ZeRO-3 runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer, pipeline

from bigrm.artifacts import export
from bigrm.builtin.synthetic import make_rows
from bigrm.config import DataConfig
from bigrm.data.packing import collate
from bigrm.data.rows import load_examples
from bigrm.data.token_store import TokenStore, concat
from bigrm.data.tokenise import encode_examples
from bigrm.errors import DataError
from bigrm.inference import scoring
from bigrm.kinds import Steps
from bigrm.model.reward_model import RewardModel, load_classifier
from tests.helpers.steps import write

PROMPT = "write a positive review of the phone in steps:"


def stepwise_rows() -> list[dict]:
    long = " ".join(["the phone was very great and"] * 12)  # cut from the left at max_length
    return [
        {"prompt": PROMPT, "completions": [" great the", " awful it"], "labels": [True, False]},
        {"prompt": PROMPT, "completions": [" great the", " lovely a", " it"], "labels": [1, 0.75, 0.5]},  # shared step
        {"prompt": long, "completions": [" superb", " it was"], "labels": [True, True], "weight": 2.0},
        {"prompt": [{"role": "user", "content": "review the phone"}], "completions": [" great", " the"],
         "labels": [True, False]},
    ]  # fmt: skip


def store_of(paths: list[Path], tokenizer, max_length: int) -> TokenStore:
    examples = [e for f in load_examples([str(p) for p in paths], DataConfig())[0] for e in f]
    return TokenStore.of(encode_examples(examples, tokenizer, max_length, "error"), examples)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_packed_values_at_step_ends_equal_each_sequence_alone(llama_dir, tmp_path, share_prompt):
    """Stepwise groups (a step shared by two solutions, a cut prompt, a chat prompt) packed with a ranked one: the
    values at step ends and at final tokens are a plain transformers forward of each sequence alone, read there."""
    tok = AutoTokenizer.from_pretrained(llama_dir)
    steps = write(tmp_path / "steps.jsonl", stepwise_rows())
    ranked = write(tmp_path / "ranked.jsonl", make_rows(2, 3, 3, 0))
    store = store_of([steps, ranked], tok, max_length=40)
    groups = list(TokenStore.load(_saved(store, tmp_path)))  # through the files a cached run memory-maps
    assert [len(g.seqs) for g in groups] == [2, 1, 1, 3, 3] and groups[1].labels.step_weights == (2.0,)
    assert len(groups[1].seqs[0]) == 40  # its prompt was cut
    for g in groups[:3]:
        for seq, ends in zip(g.seqs, g.steps, strict=True):
            assert tok.decode(seq[ends]) == "\n" * len(ends)  # every step is read at its separator

    classifier = load_classifier(str(llama_dir), torch.float32, "sdpa", tok).eval()
    batch = collate(groups, tok.pad_token_id, share_prompt=share_prompt)
    with torch.no_grad():
        got = RewardModel(classifier, "sdpa")(batch)
        plain = AutoModelForSequenceClassification.from_pretrained(llama_dir, dtype=torch.float32).eval()
        last, at_steps = [], []
        for g in groups:
            for j, seq in enumerate(g.seqs):
                ids = torch.from_numpy(seq.astype("int64"))[None]
                last.append(plain(input_ids=ids).logits[0, 0])
                if g.steps is not None:
                    hidden = plain.model(input_ids=ids).last_hidden_state[0]
                    at_steps.append(plain.score(hidden[torch.tensor(g.steps[j])])[:, 0])
    expected = torch.cat([torch.stack(last), *at_steps])
    assert len(got) == 2 + 1 + 1 + 3 + 3 + 2 + 3 + 2 + 2 and torch.allclose(got, expected, atol=1e-5)
    labels = batch.labels
    assert labels.step_label.tolist() == [1, 0, 1, 0.75, 0.5, 1, 1, 1, 0]
    assert labels.step_weight.tolist() == [1] * 5 + [2, 2] + [1, 1]
    assert labels.group_weight.tolist() == [0, 0, 0, 1, 1]  # stepwise prompts have no share of the ranking loss


def test_concatenated_stores_keep_every_group_s_steps(llama_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    steps = store_of([write(tmp_path / "steps.jsonl", stepwise_rows())], tok, 40)
    ranked = store_of([write(tmp_path / "ranked.jsonl", make_rows(2, 3, 3, 0))], tok, 40)
    joined = concat([ranked, steps, ranked, steps])
    for got, want in zip(joined, [*ranked, *steps, *ranked, *steps], strict=True):
        assert got.labels == want.labels and got.source == want.source
        assert [s.tolist() for s in got.seqs] == [s.tolist() for s in want.seqs]
        assert (got.steps is None) == (want.steps is None)
        if got.steps is not None:
            assert [e.tolist() for e in got.steps] == [e.tolist() for e in want.steps]


def _saved(store: TokenStore, tmp_path: Path) -> Path:
    store.save(tmp_path / "store")
    return tmp_path / "store"


def test_steps_that_cannot_be_located_stop_before_compute(llama_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    path = write(tmp_path / "steps.jsonl", stepwise_rows()[:1])
    joined = DataConfig(step_layout="joined")  # the layout that tokenises the joined text
    examples = load_examples([str(path)], joined)[0][0]
    with pytest.raises(DataError, match=r"steps.jsonl:line 1: completion 0: stepwise rows need .*trl or grpo"):
        encode_examples(examples, tok, 64, "error", convention="openrlhf")
    glued = write(tmp_path / "glued.jsonl", [{"prompt": "p", "completions": [" gre", "at"], "labels": [1, 0]}])
    examples = load_examples([str(glued)], DataConfig(step_separator="", step_layout="joined"))[0][0]  # " great"
    with pytest.raises(DataError, match="step 0 does not end at a token boundary"):
        encode_examples(examples, tok, 64, "error")
    examples = load_examples([str(glued)], DataConfig(step_separator=""))[0][0]  # trl: each step tokenised alone
    assert encode_examples(examples, tok, 64, "error").step_counts.tolist() == [2]


def test_token_classifier_export_gives_sigmoid_of_the_value_and_loads_back(llama_dir, tmp_path):
    """softmax(logits)[1] = σ(v) at every token through `pipeline("token-classification")`; bigrm loads it back as
    the value model it trained."""
    tok = AutoTokenizer.from_pretrained(llama_dir)
    classifier = load_classifier(str(llama_dir), torch.float32, "sdpa", tok).eval()
    dest = tmp_path / "prm"
    export.save_classifier(classifier, classifier.state_dict(), tok, dest, kind=Steps("\n"))
    assert json.loads((dest / "config.json").read_text())["architectures"] == ["LlamaForTokenClassification"]
    text = PROMPT + " great the\n awful it\n"
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = classifier.model(input_ids=ids).last_hidden_state[0]
        value = classifier.score(hidden)[:, 0]  # (T,)
        tokens = AutoModelForTokenClassification.from_pretrained(dest).eval()
        probs = tokens(input_ids=ids).logits[0].softmax(-1)[:, 1]
    assert torch.allclose(probs, torch.sigmoid(value), atol=1e-6)
    found = pipeline("token-classification", model=str(dest), device="cpu")(text)
    label_1 = [e["score"] if e["entity"] == "LABEL_1" else 1 - e["score"] for e in found]
    assert len(found) >= len(ids[0]) - 2  # every token but the special ones
    assert label_1 == pytest.approx([torch.sigmoid(value)[e["index"]].item() for e in found], abs=1e-5)
    export.seal(dest)  # what a verified export carries: scoring refuses a bigrm export without it
    model, _, _, kind = scoring.load_model(str(dest), torch.device("cpu"))
    assert isinstance(kind, Steps) and kind.separator == "\n"
    batch = collate(list(store_of([write(tmp_path / "s.jsonl", stepwise_rows()[:2])], tok, 64)), tok.pad_token_id)
    with torch.no_grad():
        back, trained = model(batch), RewardModel(classifier, "sdpa")(batch)
    assert back.shape == (2 + 2 + 3,) and torch.allclose(back, trained, atol=1e-6)  # rewards, then step ends


# 2-rank ZeRO-3 runs ---------------------------------------------------------------------------------------------
