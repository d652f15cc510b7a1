"""Stepwise rows' token layouts (data.step_layout): `trl` gives TRL PRMTrainer.tokenize_row's ids and label positions
(trl 1.13.0's own function, run from its side install, on real BPE tokenizers with and without BOS); `joined`
stays what a pipeline on the joined text reads; the step token is one id after every step in both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigrm.config import DataConfig
from bigrm.data.pipeline import cache_key
from bigrm.data.rows import load_examples
from bigrm.data.tokenise import tokenize_examples
from bigrm.data.tokenizer import add_step_token, check_step_token
from bigrm.errors import DataError
from tests.helpers import real_tokenizers
from tests.helpers.steps import natural_rows, write

TRL_PRM = Path("/tmp/trl_prm")  # `pip install --no-deps --target /tmp/trl_prm trl==1.13.0`, as bench/bench_prm.py
# TRL's docstring example of PRMTrainer.tokenize_row and the ids it documents for Qwen2.5's tokenizer
DOC_ROW = {
    "prompt": "Which number is larger, 9.8 or 9.11?",
    "completions": ["11 is greater than 8.", "Hence, 9.11 > 9.8."],
    "labels": [True, False],
}
DOC_IDS = [23085, 1372, 374, 8131, 11, 220, 24, 13, 23, 476, 220, 24, 13, 16, 16, 30, 16, 16, 374, 7046, 1091, 220, 23,
           13, 198, 39, 763, 11, 220, 24, 13, 16, 16, 861, 220, 24, 13, 23, 13, 198]  # fmt: skip


def layout(rows: list[dict], tokenizer, tmp_path: Path, **options) -> list[tuple[list[int], list[int]]]:
    """Each row's (ids, step ends) as training tokenises it, in row order (a prompt's rows are consecutive)."""
    cfg = DataConfig(**options)
    examples = load_examples([str(write(tmp_path / "rows.jsonl", rows))], cfg)[0][0]
    groups, _ = tokenize_examples(examples, tokenizer, 1024, "error")
    return [(s.tolist(), e.tolist()) for g in groups for s, e in zip(g.seqs, g.steps, strict=True)]


TRL_CHILD = """
import json, sys
from transformers import AutoTokenizer
from trl.experimental.prm import PRMTrainer
rows = json.load(open(sys.argv[2]))
out = {}
for family in sys.argv[3:]:
    tok = AutoTokenizer.from_pretrained(f"{sys.argv[1]}/{family}")
    out[family] = [PRMTrainer.tokenize_row(r, tok, "\\n", None, None, False, False) for r in rows]
print(json.dumps(out))
"""


@pytest.mark.skipif(not (TRL_PRM / "trl" / "experimental" / "prm").is_dir(), reason="needs trl==1.13.0 in /tmp/trl_prm")
def test_trl_layout_is_trl_prm_trainers_tokenize_row(tmp_path):
    rows = [*natural_rows(60), DOC_ROW]
    families = ("qwen2", "llama2", "llama3")  # no BOS; BOS the tokenizer adds itself; a byte-level BPE with BOS
    tokenizers = {f: getattr(real_tokenizers, f"{f}_tokenizer")() for f in families}
    for family, tok in tokenizers.items():
        tok.save_pretrained(tmp_path / family)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    env = {**os.environ, "PYTHONPATH": str(TRL_PRM), "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", TRL_CHILD, str(tmp_path), str(tmp_path / "rows.json"), *families],
        env=env, capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    trl = json.loads(done.stdout.splitlines()[-1])
    for family, tok in tokenizers.items():
        want = [(r["input_ids"], [i for i, y in enumerate(r["labels"]) if y != -100]) for r in trl[family]]
        assert layout(rows, tok, tmp_path) == want, family  # the default layout
        joined = layout(rows, tok, tmp_path, step_layout="joined")
        if tok.bos_token_id is not None:
            assert all(ids[0] == tok.bos_token_id for ids, _ in want)
        merged = sum(j != w for (j, _), (w, _) in zip(joined, want, strict=True))
        assert merged > len(rows) // 4, (family, merged)  # the rows exercise BPE merges across step boundaries
    assert trl["qwen2"][-1]["input_ids"] == DOC_IDS


def test_trl_layout_reads_each_separator_where_joined_text_merges_it(tmp_path):
    qwen = real_tokenizers.qwen2_tokenizer()
    ids, ends = layout([DOC_ROW], qwen, tmp_path)[0]
    assert ids == DOC_IDS and ends == [24, 39]  # TRL's documented ids and labels, "\n" (198) after each step
    joined, joined_ends = layout([DOC_ROW], qwen, tmp_path, step_layout="joined")[0]
    assert joined[22:24] == [23, 624] and joined_ends[0] == 23  # ".\n" is one token there, read as the step end
    assert joined[-1] == qwen.eos_token_id  # the reward convention's EOS; the trl layout appends none


def test_a_step_token_is_one_id_after_every_step_in_both_layouts(tmp_path):
    qwen = real_tokenizers.qwen2_tokenizer()
    with pytest.raises(DataError, match="not a special token"):
        check_step_token(qwen, "<extra_0>")
    add_step_token(qwen, "<extra_0>")
    check_step_token(qwen, "<extra_0>")
    token = qwen.convert_tokens_to_ids("<extra_0>")
    rows = natural_rows(20)
    trl = layout(rows, qwen, tmp_path, step_token="<extra_0>")
    joined = layout(rows, qwen, tmp_path, step_token="<extra_0>", step_layout="joined")
    for (ids, ends), (j_ids, j_ends), row in zip(trl, joined, rows, strict=True):
        assert len(ends) == len(row["completions"]) and [ids[e] for e in ends] == [token] * len(ends)
        assert [j_ids[e] for e in j_ends] == [token] * len(ends) and ids.count(token) == len(ends)
    n = len(qwen)
    add_step_token(qwen, "<extra_0>")  # already there: nothing added
    assert len(qwen) == n


def test_the_layout_and_step_token_key_the_token_cache(tmp_path):
    tok = real_tokenizers.qwen2_tokenizer()
    path = str(write(tmp_path / "rows.jsonl", natural_rows(2)))
    keys = {
        cache_key(DataConfig(**o), 0, tok, [path], []) for o in ({}, {"step_layout": "joined"}, {"step_token": "<s>"})
    }
    assert len(keys) == 3
