"""Config → tokenised train and eval groups: files or the synthetic task, hold-out, file weights, the budget check."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from bigrm.config import Config
from bigrm.data import pipeline
from bigrm.data.packing import shared_prefix
from bigrm.data.tokenizer import prepare_tokenizer
from bigrm.errors import DataError


def build(cfg: Config, tokenizer, directory) -> pipeline.Dataset:
    return pipeline.build(cfg.data, cfg.train.seed, tokenizer, directory)


@pytest.fixture(scope="module")
def tok(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    prepare_tokenizer(tokenizer)
    return tokenizer


def config(data: dict | None = None, **train) -> Config:
    cfg = Config()
    cfg.data = replace(cfg.data, max_length=64, **(data or {}))
    cfg.train = replace(cfg.train, **train)
    return cfg


def write(path, n: int, start: int = 0):
    rows = [{"prompt": f"q{i}", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_synthetic_task_takes_the_files_path(tmp_path, tok):
    cfg = config({"synthetic": replace(Config().data.synthetic, num_train=30, num_eval=6)})
    pipeline.write_synthetic(cfg.data, tmp_path, cfg.train.seed)
    data = build(cfg, tok, tmp_path)
    assert (len(data.train), len(data.eval)) == (30, 6) and data.train_files == [list(range(30))]
    assert data.log[0] == "train data: 30 rows read, 0 skipped" and data.log[1] == "eval data: 6 rows read, 0 skipped"


def test_load_writes_the_synthetic_task_inside_first_then_reads_it(tmp_path, llama_dir):
    """The trainer's and `bigrm prepare`'s one path: the writing process writes inside `first` (the others' wait);
    a process that does not write reads what the writer wrote."""
    cfg = config({"synthetic": replace(Config().data.synthetic, num_train=30, num_eval=6)})
    cfg.model = replace(cfg.model, path=str(llama_dir))
    seen = []

    @contextlib.contextmanager
    def first():
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        yield
        seen.append(sorted(p.name for p in tmp_path.iterdir()))

    tokenizer, data = pipeline.load(cfg, tmp_path, first())
    assert seen == [[], ["synthetic-eval.jsonl", "synthetic-train.jsonl"]]
    assert (len(data.train), len(data.eval)) == (30, 6) and tokenizer.pad_token_id != tokenizer.eos_token_id
    train = tmp_path / "synthetic-train.jsonl"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:10]))
    _, reader = pipeline.load(cfg, tmp_path, first(), writes=False)
    assert len(reader.train) == 10 and len(seen) == 4


def test_eval_fraction_holds_out_prompts_of_every_file_by_seed(tmp_path, tok):
    files = [write(tmp_path / "a.jsonl", 20), {"path": write(tmp_path / "b.jsonl", 10, start=100), "weight": 2.0}]
    cfg = config({"train_files": files, "eval_fraction": 0.2})
    data = build(cfg, tok, tmp_path)
    assert (len(data.train), len(data.eval)) == (24, 6) and data.weights == [1.0, 2.0]
    assert data.train_files == [list(range(16)), list(range(16, 24))]
    held = {g.source for g in data.eval}
    assert not held & {g.source for g in data.train} and sum(":line" in s and "b.jsonl" in s for s in held) == 2
    assert {g.source for g in build(cfg, tok, tmp_path).eval} == held  # the same hold-out every run
    reseeded = replace(cfg, train=replace(cfg.train, seed=1))
    assert {g.source for g in build(reseeded, tok, tmp_path).eval} != held


def test_eval_fraction_holds_out_whole_prompts(tmp_path, tok):
    """Rows sharing a prompt (several pairs of one prompt; a PRM's solutions, split into groups of
    data.step_group_size) all go to one side of the hold-out: no eval prompt is trained on."""
    pairs = [{"prompt": f"q{i % 5}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    steps = [
        {"prompt": f"s{i % 4}", "completions": [f"step {i}", "end"], "labels": [True, i % 2 == 0]} for i in range(24)
    ]
    paths = []
    for name, rows in (("pairs.jsonl", pairs), ("steps.jsonl", steps)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(tmp_path / name))
    cfg = config({"train_files": paths, "eval_fraction": 0.4, "step_group_size": 4})
    data = build(cfg, tok, tmp_path)

    def prompts(groups) -> set[str]:
        return {tok.decode(g.seqs[0][: shared_prefix(g.seqs) or len(g.seqs[0]) - 1]) for g in groups}

    # pairs: 2 of 5 prompts (8 rows) held out; steps: 2 of 4 prompts, 6 solutions each in groups of 4 and 2
    assert len(data.eval) == 8 + 4 and len(data.train) == 12 + 4
    assert sum(g.labels.steps is not None for g in data.eval) == 4
    assert "eval data: 4 prompts held out (12 groups; data.eval_fraction=0.4)" in data.log
    assert not prompts(data.eval) & prompts(data.train)


def test_a_prompt_over_the_token_budget_stops_before_training(tmp_path, llama_dir):
    cfg = config({"train_files": [write(tmp_path / "a.jsonl", 4)]}, max_tokens_per_batch=8)
    cfg.model = replace(cfg.model, path=str(llama_dir))
    with pytest.raises(DataError, match=r"4 train prompt\(s\) need more than train.max_tokens_per_batch=8 tokens") as e:
        pipeline.load(cfg, tmp_path)
    assert "raise the budget (train.sequence_parallel: N splits each micro-batch over N ranks)" in str(e.value)


def test_no_training_prompt_left_is_an_error(tmp_path, tok):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")  # a duplicate: invalid
    with pytest.raises(DataError, match="no training prompts left"):
        build(config({"train_files": [str(path)], "skip_invalid": True}), tok, tmp_path)
