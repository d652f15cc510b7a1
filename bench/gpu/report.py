"""check.sh's bookkeeping: the machine (`env`), one line per part (`record`), and the summary (`summary`):
results.json and results.md in the output directory.

    python bench/gpu/report.py env WORK/env.json
    python bench/gpu/report.py record WORK --part NAME [--kind K --rc N --box S --seconds S --command C]
                                           [--status skipped --reason TEXT]
    python bench/gpu/report.py summary WORK DEST --budget S --dry-run 0|1
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))  # the benchmarks are scripts that import each other by file name

from bench_memory import table  # noqa: E402

# What the check needs importable, and the versions worth having beside its figures.
NEEDED = ["bigrm", "deepspeed", "datasets", "trl", "jsonargparse", "docstring_parser"]
VERSIONS = ["torch", "transformers", "deepspeed", "datasets", "trl", "peft", "accelerate", "bitsandbytes",
            "flash-attn", "triton", "jsonargparse", "numpy", "tokenizers"]  # fmt: skip
TIMED_OUT = (124, 137)  # timeout's own code, and a KILL after its grace period


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def nvidia_smi(field: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader", "-i", "0"]
    return subprocess.run(query, capture_output=True, text=True).stdout.strip() or None


def environment() -> dict:
    """The device, its software, and whether everything the check imports imports."""
    import torch

    cuda = torch.cuda.is_available()
    imports = {}
    for name in NEEDED:
        try:
            importlib.import_module(name)
            imports[name] = "ok"
        except Exception as e:  # noqa: BLE001 - any failure to import is the finding
            imports[name] = f"{type(e).__name__}: {e}"
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "driver": nvidia_smi("driver_version"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {platform.node()}",
        "packages": {name: version(name) for name in VERSIONS},
        "imports": imports,
        # what the next kit must match: every distribution's version, and the requirements pip finds unmet
        "installed": dict(sorted((d.metadata["Name"], d.version) for d in metadata.distributions())),
        "pip_check": subprocess.run(
            [sys.executable, "-m", "pip", "check"], capture_output=True, text=True
        ).stdout.splitlines(),
    }


def record(work: Path, args) -> None:
    if args.status is None:
        args.status = "ok" if args.rc == 0 else "timed out" if args.rc in TIMED_OUT else "failed"
    line = {k: v for k, v in vars(args).items() if k not in ("cmd", "work") and v is not None}
    with open(work / "parts.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")


def pytest_counts(xml: Path) -> dict:
    """Totals of a JUnit report, and the tests that failed or erred."""
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = suite.findall("testcase")
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None
           or c.find("error") is not None]  # fmt: skip
    skipped = sum(c.find("skipped") is not None for c in cases)
    return {"tests": len(cases), "failed": len(bad), "skipped": skipped, "passed": len(cases) - len(bad) - skipped,
            "failures": bad}  # fmt: skip


def figures(work: Path, part: dict) -> dict | None:
    """A part's own figures, where it wrote any."""
    kind, name = part.get("kind"), part["part"]
    path = work / (f"{name}.xml" if kind == "pytest" else f"{name}.json")
    if kind == "pytest" and path.exists():
        return pytest_counts(path)
    if kind in ("bench_gpu", "bench_speed", "env") and path.exists():
        return json.loads(path.read_text())
    return None


def parts_table(parts: list[dict]) -> str:
    rows = [{"part": p["part"], "status": p["status"], "seconds": p.get("seconds"), "box": p.get("box"),
             "note": p.get("reason") or (f"exit {p['rc']}" if p.get("rc") else "")} for p in parts]  # fmt: skip
    for r in rows:
        r["seconds"] = "" if r["seconds"] is None else f"{float(r['seconds']):.0f}"
        r["box"] = "" if r["box"] is None else str(r["box"])
    return table(rows, [("part", "part", "s"), ("status", "status", "s"), ("seconds", "s", "s"),
                        ("box", "box s", "s"), ("note", "note", "s")])  # fmt: skip


SPEED = [("data", "data", "s"), ("variant", "variant", "s"), ("prompts_per_s", "prompts/s", ".2f"),
         ("real_tokens_per_s", "tokens/s", ",.0f"), ("padding_efficiency", "pad eff", ".3f"),
         ("sequences_per_prompt", "seq/prompt", ".1f"), ("memory", "peak MiB", ",.0f"),
         ("vs_trl-all", "÷ TRL all pairs", "s"), ("vs_trl-adjacent", "÷ TRL adjacent", "s")]  # fmt: skip


def speed_table(speed: dict) -> str:
    rows = []
    for data, variants in speed.items():
        for variant, r in variants.items():
            row = {**r, "data": data, "variant": variant, "memory": r.get("peak_gpu_mib", r.get("peak_rss_mib"))}
            for base in ("trl-all", "trl-adjacent"):
                ratio = r.get(f"vs_{base}")
                row[f"vs_{base}"] = f"{ratio[0]:.2f}× ({ratio[1]:.2f}–{ratio[2]:.2f})" if ratio else ""
            rows.append(row)
    return table(rows, SPEED)


def markdown(result: dict) -> str:
    env = result["env"] or {}
    head = (f"GPU: {env.get('gpu') or 'none (CPU)'}, driver {env.get('driver')}; torch {env.get('torch')}, "
            f"CUDA {env.get('cuda')}; Python {env.get('python')}; "
            + ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v and k != "torch"))  # fmt: skip
    lines = [f"# bigrm GPU check{' (dry run, CPU)' if result['dry_run'] else ''}, {result['date']}", "", head, "",
             f"{result['seconds']:.0f} s of a {result['budget']} s budget.", "", "## Parts", "",
             parts_table(result["parts"])]  # fmt: skip
    tests = next((p["figures"] for p in result["parts"] if p.get("kind") == "pytest" and p.get("figures")), None)
    if tests:
        lines += ["", "## pytest -m gpu", "", "{passed} passed, {failed} failed, {skipped} skipped".format(**tests)]
        lines += [f"- failed: {name}" for name in tests["failures"]]
    runs = [dict(run, setup=f"{p['part']}: {run['setup']}") for p in result["parts"]
            if p.get("kind") == "bench_gpu" and p.get("figures") for run in p["figures"]["runs"]]  # fmt: skip
    if runs:
        import bench_gpu  # here only: it imports torch and bigrm

        lines += ["", "## The trainer (bench_gpu.py)", "", bench_gpu.report(runs)]
    speed = next((p["figures"] for p in result["parts"] if p.get("kind") == "bench_speed" and p.get("figures")), None)
    if speed:
        lines += ["", "## bigrm vs TRL RewardTrainer (bench_speed.py)", "", speed_table(speed)]
    return "\n".join(lines) + "\n"


def summary(work: Path, dest: Path, budget: int, dry_run: bool, started: float) -> int:
    """results.json and results.md; exit status 1 when a part failed or ran out of its box."""
    parts = [json.loads(line) for line in (work / "parts.jsonl").read_text().splitlines()]
    for p in parts:
        p["figures"] = figures(work, p)
    env = next((p.pop("figures") for p in parts if p.get("kind") == "env"), None)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry_run, "budget": budget,
              "seconds": time.time() - started, "env": env, "parts": parts}  # fmt: skip
    (dest / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (dest / "results.md").write_text(markdown(result))
    print(markdown(result))
    return int(any(p["status"] in ("failed", "timed out") for p in parts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    env = sub.add_parser("env")
    env.add_argument("json", type=Path)
    rec = sub.add_parser("record")
    rec.add_argument("work", type=Path)
    rec.add_argument("--part", required=True)
    for flag, kind in (("--kind", str), ("--status", str), ("--reason", str), ("--command", str),
                       ("--rc", int), ("--box", int), ("--seconds", float)):  # fmt: skip
        rec.add_argument(flag, type=kind)
    summ = sub.add_parser("summary")
    summ.add_argument("work", type=Path)
    summ.add_argument("dest", type=Path)
    summ.add_argument("--budget", type=int, required=True)
    summ.add_argument("--dry-run", type=int, default=0)
    summ.add_argument("--started", type=float, required=True)
    args = p.parse_args()
    if args.cmd == "env":
        found = environment()
        args.json.write_text(json.dumps(found, indent=1) + "\n")
        sys.exit(int(any(v != "ok" for v in found["imports"].values())))
    if args.cmd == "record":
        record(args.work, args)
    else:
        sys.exit(summary(args.work, args.dest, args.budget, bool(args.dry_run), args.started))


if __name__ == "__main__":
    main()
