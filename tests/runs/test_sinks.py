"""train.report_to: an offline Weights & Biases run holds every scalar of log.jsonl and the config; `none` writes no
tracker files; wandb asked for and missing stops before any work."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import pytest

from bigrm import cli, options
from tests.helpers.paths import REPO

RUN = [
    "--data.synthetic.num_train", "64", "--data.synthetic.num_eval", "16", "--max_tokens_per_batch", "400",
    "--log_every", "1", "--eval_every", "2", "--export", "false", "--max_steps", "4",
]  # fmt: skip


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B never reaches the network and writes nothing outside this test's directory."""
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "bigrm-test")


def train(out, *args: str) -> None:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--output_dir", str(out), *RUN, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def wandb_records(run_dir) -> list:
    """The protobuf records of an offline run's .wandb file: a LevelDB-style log (a 7-byte file header, then 32 KiB
    blocks of records, each a 7-byte header (CRC, length, type) and a fragment; types 1 (whole) and 4 (last
    fragment) end a record). wandb itself reads it only in its Go core."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, block, pos, fragment, records = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer or padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        fragment += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(fragment)
            records.append(record)
            fragment = b""
    return records


def finished_records(run_dir, timeout: float = 30.0) -> list:
    """wandb_records once the run's `exit` record is on disk: wandb's service writes the file after run.finish()
    returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def history_and_config(run_dir) -> tuple[list[dict], dict]:
    history, config = [], {}
    for r in finished_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        config.update({u.key: json.loads(u.value_json) for u in updates})
    return history, config


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wandb") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_PROJECT", "bigrm-test")
        for key in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(key, str(out.parent / key.lower()))
        mp.delenv("WANDB_DIR", raising=False)
        train(out, "--report_to", "[tensorboard, wandb]", "--run_name", "tiny-rm")
    return out


def test_offline_wandb_run_holds_every_scalar_and_the_config(wandb_run):
    out = wandb_run
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run_id = (out / "wandb_run_id").read_text().strip()
    assert run_dir.name.endswith(run_id)
    history, config = history_and_config(run_dir)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    series = [r for r in rows if r["split"] in ("train", "eval")]
    assert {r["split"] for r in series} == {"train", "eval"} and len(series) == 4 + 2
    for row in series:
        split, step = row["split"], row["step"]
        logged = next(h for h in history if h.get("train/global_step") == step and f"{split}/loss" in h)
        for key, value in row.items():
            if key not in ("split", "step"):
                assert logged[f"{split}/{key}"] == pytest.approx(value, rel=1e-12), (split, step, key)
    # the resolved config as config.yaml holds it, and the setup figures of log.jsonl
    resolved = options.to_dict(options.load(out / "config.yaml", []))
    assert {k: config[k] for k in resolved} == resolved
    assert config["train"]["report_to"] == ["tensorboard", "wandb"] and config["train"]["max_steps"] == 4
    setup = next(r for r in rows if r["split"] == "setup")
    assert config["setup"] == {k: v for k, v in setup.items() if k != "split"}
    run = next(r.run for r in finished_records(run_dir) if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.project, run.run_id) == ("tiny-rm", "bigrm-test", run_id)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # both sinks at once


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    from bigrm.training.sinks import WandB

    first = WandB(tmp_path, "r", {"a": 1}, resumed=False)
    first.log("train", {"loss": 1.0}, 1)
    first.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    resumed = WandB(tmp_path, "r", {"a": 1}, resumed=True)
    resumed.log("train", {"loss": 0.5}, 2)
    resumed.close()
    fresh = WandB(tmp_path, "r", {"a": 1}, resumed=False)  # a new start in the same directory is a new run
    fresh.close()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    ids = [next(r.run.run_id for r in finished_records(d) if r.WhichOneof("record_type") == "run") for d in runs]
    assert sorted(ids) == sorted([run_id, run_id, (tmp_path / "wandb_run_id").read_text().strip()])
    assert len(set(ids)) == 2


def test_report_to_none_writes_no_tracker_files(tmp_path):
    out = tmp_path / "run"
    train(out, "--report_to", "none", "--max_steps", "2", "--eval_every", "0")
    assert (out / "log.jsonl").exists()
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()
    assert not (out / "wandb_run_id").exists()


def test_wandb_missing_stops_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib finds no such module
    out = tmp_path / "run"
    assert cli.train_main(["--output_dir", str(out), "--report_to", "wandb"]) == 2
    assert "pip install 'bigrm[wandb]'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("given", "resolved"),
    [("wandb", ["wandb"]), ("[tensorboard, wandb]", ["tensorboard", "wandb"]), ("none", []), ("[]", [])],
)
def test_report_to_takes_one_name_a_list_or_none(given, resolved):
    assert options.from_argv(["--report_to", given]).train.report_to == resolved


def test_report_to_refuses_unknown_trackers():
    from bigrm.errors import ConfigError

    with pytest.raises(ConfigError, match="--train.report_to: Got value: mlflow, expected one of"):
        options.from_argv(["--report_to", "mlflow"])
