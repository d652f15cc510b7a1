"""bench/gpu: the GPU check's dry run on CPU (its parts, time boxes, JSON and table), and the wheel set it carries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.helpers.paths import HH_DATA, REPO

GPU = REPO / "bench" / "gpu"
sys.path.insert(0, str(GPU))

import report  # noqa: E402

PARTS = ["install", "env", "gpu-tests", "bench-1b", "speed", "compiled", "attn-eager", "attn-varlen", "attn-flex",
         "attn-flash_attn", "qlora", "sequence-parallel", "serve", "vllm"]  # fmt: skip
HEAVY = "gpu-tests,bench-1b,attn-eager,compiled,speed,qlora"
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHON": sys.executable}


def check(tmp_path: Path, *args: str, timeout: int) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    cmd = ["bash", str(GPU / "check.sh"), "--dry-run", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout)
    return proc, json.loads((out / "results.json").read_text())


def wheel(kit: Path, body: bytes | None = None) -> Path:
    """A one-module pure wheel in kit/wheels (or a file of that name holding `body`)."""
    path = kit / "wheels" / "gpukit_probe-0.1-py3-none-any.whl"
    path.parent.mkdir(parents=True)
    if body is not None:
        path.write_bytes(body)
        return path
    info = "gpukit_probe-0.1.dist-info"
    files = {
        "gpukit_probe/__init__.py": "",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpukit-probe\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def by_part(result: dict) -> dict[str, dict]:
    return {p["part"]: p for p in result["parts"]}


@pytest.mark.slow  # five trainer and benchmark children on the CPU: about a minute and a half on 2 cores
@pytest.mark.skipif(not HH_DATA.exists(), reason="needs the HH data in ../shared/data")
def test_dry_run_runs_every_part_and_writes_its_figures(tmp_path):
    wheel(tmp_path / "kit")
    proc, result = check(tmp_path, "--kit", str(tmp_path / "kit"), "--skip", "compiled,qlora", timeout=960)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    parts = by_part(result)
    assert list(parts) == PARTS and result["dry_run"]
    for name in ("install", "env", "gpu-tests", "bench-1b", "attn-eager", "speed"):
        assert parts[name]["status"] == "ok", parts[name]
        assert 0 <= parts[name]["seconds"] <= parts[name]["box"] + 10
    for name in ("attn-varlen", "attn-flex", "sequence-parallel", "serve", "vllm", "compiled", "qlora"):
        assert parts[name]["status"] == "skipped" and parts[name]["reason"], parts[name]
    assert parts["compiled"]["reason"] == "left out (--skip)"
    env = result["env"]
    assert env["torch"] and env["python"] and env["gpu"] is None and set(env["imports"].values()) == {"ok"}
    tests = parts["gpu-tests"]["figures"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"]  # every GPU test, none runnable here
    run = parts["bench-1b"]["figures"]["runs"][0]
    assert run["attn"] == "sdpa" and run["tokens_per_s_per_gpu"] > 0 and run["windows"] == 2
    assert parts["attn-eager"]["figures"]["runs"][0]["attn_resolved"] == "eager"
    assert set(parts["speed"]["figures"]["K=2"]) == {"bigrm", "bigrm+share", "trl-all", "trl-adjacent"}
    table = (tmp_path / "out" / "results.md").read_text()
    assert "GPU: none (CPU)" in table and f"torch {env['torch']}" in table
    assert "| bench-1b | ok |" in table and "| bench-1b: 1b-full | sdpa |" in table
    assert "| K=2 | bigrm |" in table and "| vllm | skipped |" in table
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/bench-1b.log" in names and "logs/speed.log" in names
    assert any(n.endswith("train.out") for n in names)


def test_a_failing_part_costs_only_itself(tmp_path):
    """A kit whose wheel is broken: the install fails, the next part still runs, and the check exits 1."""
    wheel(tmp_path / "kit", body=b"not a zip file")
    proc, result = check(tmp_path, "--kit", str(tmp_path / "kit"), "--skip", HEAVY, timeout=120)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    parts = by_part(result)
    assert parts["install"]["status"] == "failed" and parts["install"]["rc"] != 0
    assert parts["env"]["status"] == "ok" and parts["bench-1b"]["reason"] == "left out (--skip)"
    assert "| install | failed |" in (tmp_path / "out" / "results.md").read_text()


def test_no_part_starts_past_the_deadline(tmp_path):
    proc, result = check(tmp_path, "--kit", str(tmp_path / "no-kit"), "--budget", "20", timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    parts = by_part(result)
    assert list(parts) == PARTS
    assert parts["install"]["reason"].startswith("no wheels in")
    assert parts["env"]["reason"].startswith("out of time") and parts["speed"]["reason"].startswith("out of time")
    assert result["env"] is None and result["seconds"] < 20


def test_record_names_a_killed_part_timed_out(tmp_path):
    for part, rc in (("a", 0), ("b", 1), ("c", 124), ("d", 137)):
        subprocess.run([sys.executable, str(GPU / "report.py"), "record", str(tmp_path), "--part", part,
                        "--rc", str(rc), "--box", "5", "--seconds", "1.5"], check=True)  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "parts.jsonl").read_text().splitlines()]
    assert [r["status"] for r in lines] == ["ok", "failed", "timed out", "timed out"]


def test_pytest_counts_reads_a_junit_report(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest"><testcase classname="t" name="ok"/>'
        '<testcase classname="t" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="t" name="skip"><skipped message="no CUDA"/></testcase></testsuite></testsuites>'
    )
    assert report.pytest_counts(xml) == {"tests": 3, "failed": 1, "skipped": 1, "passed": 1, "failures": ["t::bad"]}


def test_speed_table_shows_the_ratios():
    speed = {"K=4": {"bigrm": {"prompts_per_s": 2.0, "real_tokens_per_s": 100.0, "padding_efficiency": 1.0,
                               "sequences_per_prompt": 4.0, "peak_gpu_mib": 2048.0, "vs_trl-all": [3.0, 2.5, 3.5],
                               "vs_trl-adjacent": [1.5, 1.4, 1.6]}}}  # fmt: skip
    assert "| K=4 | bigrm | 2.00 | 100 | 1.000 | 4.0 | 2,048 | 3.00× (2.50–3.50) | 1.50× (1.40–1.60) |" in (
        report.speed_table(speed)
    )


def test_wheel_set_follows_requirements_past_what_the_machine_has():
    pytest.importorskip("tomllib")
    import wheelset

    have = wheelset.present(GPU / "present.txt")
    assert {"torch", "transformers", "py-cpuinfo", "pyyaml", "typing-extensions"} <= have
    pinned, missing = wheelset.closure(["deepspeed", "no-such-package-gpukit>=1"], have)
    assert {"deepspeed", "pydantic", "pydantic-core", "hjson"} <= set(pinned)
    assert not {"torch", "numpy", "psutil"} & set(pinned)
    from importlib.metadata import version

    assert pinned["pydantic"] == version("pydantic")
    assert missing == ["no-such-package-gpukit>=1"]
    pinned, _ = wheelset.closure(wheelset.roots(["bench"]), have)
    assert {"deepspeed", "datasets", "trl", "jsonargparse", "docstring-parser", "dill", "multiprocess"} <= set(pinned)


def test_markers_are_read_for_the_gpu_machines_python():
    import wheelset

    assert not wheelset.applies(Requirement('tomli; python_version < "3.11"'), frozenset())
    assert wheelset.applies(Requirement('uvloop; sys_platform == "linux"'), frozenset())
    assert not wheelset.applies(Requirement('rich; extra == "cli"'), frozenset())
    assert wheelset.applies(Requirement('rich; extra == "cli"'), frozenset({"cli"}))
