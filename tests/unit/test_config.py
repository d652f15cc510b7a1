from __future__ import annotations

import dataclasses
import json
import re

import pytest

from bigrm import options
from bigrm.config import TrainConfig
from bigrm.errors import ConfigError
from bigrm.training import ds_config


def test_default_recipe_loads_and_overrides_apply():
    cfg = options.from_argv(
        ["--output_dir", "/tmp/x", "--train.lr=0.5", "--data.synthetic.max_k", "4", "--local_rank=1"]
    )
    assert cfg.train.output_dir == "/tmp/x"
    assert cfg.train.lr == 0.5
    assert options.from_argv(["--lr", "3e-3"]).train.lr == 0.003  # YAML 1.1 reads this as a string
    assert cfg.data.synthetic.max_k == 4
    assert cfg.model.path == ""  # the tiny recipe


def test_shipped_recipes_are_valid():
    for recipe in sorted(options.RECIPES.glob("*.yaml")):
        options.from_argv(["--config", str(recipe)])


def test_yaml_file_and_nested_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train_files: [a.jsonl, {path: b.jsonl, weight: 0.5}]\ntrain:\n  epochs: 2\n")
    cfg = options.from_argv(["--config", str(path), "--local_rank", "0", "--micro_batches_per_step", "4"])
    assert cfg.data.train_files == ["a.jsonl", {"path": "b.jsonl", "weight": 0.5}]
    assert cfg.train.epochs == 2 and cfg.train.micro_batches_per_step == 4
    assert cfg.train.lr == TrainConfig().lr  # untouched keys keep their defaults


@pytest.mark.parametrize(
    "text, match",
    [
        ("train:\n  nope: 1\n", "bad.yaml: Option 'train.nope' is not accepted"),
        ("train:\n  epochs: two\n", "bad.yaml: train.epochs: expected int. Got value: two"),
        ("train:\n  lr: -1\n", "train.lr: must be > 0"),
        ("model:\n  attn_impl: magic\n", r"bad.yaml: model.attn_impl: expected Literal\['auto', 'sdpa'.*magic"),
        ("data:\n  overlong: cut\n", r"bad.yaml: data.overlong: expected Literal\['error', 'skip'\]. Got value: cut"),
        ("data:\n  num_proc: -1\n", "data.num_proc: must be >= 0"),
        ("data:\n  step_group_size: 0\n", "data.step_group_size: must be > 0"),
        ("data:\n  synthetic:\n    task: maths\n", r"data.synthetic.task: expected Literal\['ranked', 'steps'.*maths"),
        ("data:\n  train_files: [{path: a.jsonl, wieght: 2}]\n", "bad.yaml: data.train_files: .*'wieght'"),
        ("model:\n  path:\n", "bad.yaml: model.path: expected str. Got value: None"),  # a null is checked too
        ("train: [\n", "cannot read config .*bad.yaml: while parsing"),
        ("loss:\n  step_coef: -1\n", "loss.step_coef: must be >= 0"),
        ("- a\n", "bad.yaml: the top level must be a mapping"),
    ],
)
def test_bad_yaml_names_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        options.from_argv(["--config", str(path)])


def test_bad_overrides():
    with pytest.raises(ConfigError, match="unrecognized arguments: --no_such_key 1"):
        options.from_argv(["--no_such_key", "1"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --train.nope"):
        options.from_argv(["--train.nope", "1"])
    with pytest.raises(ConfigError, match="--train.lr: expected one argument"):
        options.from_argv(["--lr"])
    with pytest.raises(ConfigError, match="--train.export: expected bool. Got value: maybe"):
        options.from_argv(["--export", "maybe"])
    with pytest.raises(ConfigError, match=r"--data.overlong: expected Literal\['error', 'skip'\]. Got value: cut"):
        options.from_argv(["--data.overlong=cut"])
    with pytest.raises(ConfigError, match=r"--quantization.bits: expected Literal\[0, 4, 8\]. Got value: 3"):
        options.from_argv(["--r", "8", "--bits", "3"])
    with pytest.raises(ConfigError, match="train.report_to: `none` stands alone"):
        options.from_argv(["--report_to", "[none, wandb]"])
    with pytest.raises(ConfigError, match=r"stepwise rows .* and data.attributes .* cannot be trained in one run"):
        options.from_argv(["--data.synthetic.task", "steps", "--data.attributes", "[a, b]"])


def test_every_option_is_documented_once_from_its_field_docstring():
    text = options.help_text()
    helps = {a.dest: a.help for a in options.train_parser()._actions}
    for key in options.LEAVES:
        assert helps[key] and text.count(f"--{key} ") == 1, key
    assert helps["train.lr"] == "Peak learning rate (AdamW)."  # the docstring under TrainConfig.lr
    assert "--config FILE.yaml" in text and "--local_rank" in text


def test_bare_keys_are_unique_or_rejected(monkeypatch):
    bare = [k.rsplit(".", 1)[-1] for k in options.LEAVES]
    for key in options.LEAVES:
        name = key.rsplit(".", 1)[-1]
        if bare.count(name) == 1:
            assert options.resolve_key(name) == key
    assert options.from_argv(["--max_length=32", "--seed", "7"]).data.max_length == 32
    # score and eval take the bare names of their sections only, and leave their own options alone
    argv = ["--model", "m", "--max_length", "5", "--data", "f.jsonl", "--tie_threshold=0.2", "--segments"]
    assert options.split_sections(argv, ("data",)) == (
        ["--model", "m", "--data", "f.jsonl", "--tie_threshold=0.2", "--segments"],
        ["--data.max_length", "5"],
    )
    monkeypatch.setattr(options, "LEAVES", ("a.x", "b.x", "b.y"))
    assert options.split_sections(["--y", "1"], ("a", "b")) == ([], ["--b.y", "1"])
    with pytest.raises(ConfigError, match="--x is ambiguous: use one of a.x, b.x"):
        options.split_sections(["--x", "1"], ("a", "b"))


def test_dump_round_trips(tmp_path):
    cfg = options.from_argv(["--lr", "0.01"])
    options.dump(cfg, tmp_path / "c.yaml")
    again = options.from_argv(["--config", str(tmp_path / "c.yaml")])
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_deepspeed_auto_values_filled():
    cfg = options.from_argv(["--micro_batches_per_step", "3", "--lr", "0.002", "--grad_clip", "0.5"])
    ds = ds_config.build(cfg.train, total_steps=100, bf16=False, cpu=True, hidden_size=64)
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["optimizer"]["params"]["lr"] == 0.002
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["gradient_clipping"] == 0.5
    assert ds["scheduler"]["params"]["total_num_steps"] == 100
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert "auto" not in json.dumps(ds)


def test_optimizer_is_torch_adamw_fused_on_gpus_unless_the_json_says(tmp_path):
    cfg = options.from_argv([])
    gpu = ds_config.build(cfg.train, total_steps=10, bf16=True, cpu=False, hidden_size=32)["optimizer"]["params"]
    cpu = ds_config.build(cfg.train, total_steps=10, bf16=False, cpu=True, hidden_size=32)["optimizer"]["params"]
    assert gpu["torch_adam"] is cpu["torch_adam"] is True and gpu["fused"] is True and cpu["fused"] is False
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"params": {"torch_adam": False}}}))
    cfg = options.from_argv(["--deepspeed_config", str(path)])
    params = ds_config.build(cfg.train, total_steps=10, bf16=True, cpu=False, hidden_size=32)["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params  # DeepSpeed's FusedAdam takes no such option


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_shipped_stage_config_fills(stage):
    cfg = options.from_argv(["--deepspeed_config", f"ds_configs/zero{stage}.json"])
    ds = ds_config.build(cfg.train, total_steps=10, bf16=True, cpu=False, hidden_size=32)
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] is True
    assert "auto" not in json.dumps(ds)


def test_deepspeed_fixed_value_conflict_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_accumulation_steps": 8, "zero_optimization": {"stage": 2}}))
    cfg = options.from_argv(["--deepspeed_config", str(path), "--micro_batches_per_step", "2"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is 8"):
        ds_config.build(cfg.train, total_steps=10, bf16=False, cpu=True, hidden_size=32)


@pytest.mark.parametrize(
    ("ds", "cpu", "message"),
    [
        ({"train_batch_size": 64}, False, "train_batch_size: bigrm derives it"),  # was silently dropped
        ({"zero_optimization": {"stage": 7}}, False, "zero_optimization.stage: 7 is not one of 0, 1, 2, 3"),
        ({"fp16": {"enabled": True}}, True, "fp16.enabled: fp16 training needs a GPU"),
    ],
)
def test_deepspeed_json_that_bigrm_cannot_honour_is_a_config_error(tmp_path, ds, cpu, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=f"{path}: {re.escape(message)}"):
        ds_config.read(options.from_argv(["--deepspeed_config", str(path)]).train, cpu=cpu)
    path.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 2}}))
    assert ds_config.read(options.from_argv(["--deepspeed_config", str(path)]).train, cpu=cpu)[0]["zero_optimization"]


def test_model_path_must_be_a_local_model_directory_covering_max_length(tmp_path):
    from bigrm.model.reward_model import check_model_path

    with pytest.raises(ConfigError, match="model.path: org/missing-7b is not a directory: .*hf download"):
        check_model_path("org/missing-7b", 512)  # a hub name used to wait for the network, then fail obscurely
    with pytest.raises(ConfigError, match="has no config.json"):
        check_model_path(str(tmp_path), 512)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    check_model_path(str(tmp_path), 256)
    with pytest.raises(ConfigError, match="data.max_length: 257 is more than the 256 positions of .*config.json"):
        check_model_path(str(tmp_path), 257)
