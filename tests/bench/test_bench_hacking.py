"""bench/bench_hacking.py end to end at its smallest: both models train, and the table reports both."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.helpers.paths import REPO


def test_bench_hacking_trains_both_models_side_by_side():
    cmd = [sys.executable, str(REPO / "bench" / "bench_hacking.py"), "--train", "120", "--eval", "40", "--epochs", "1",
           "--seeds", "0", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("plain BT", "length-disentangled"):
        row = re.search(rf"^\| {name} \| ([0-9.]+) \| ([0-9.]+) \| \d+ \|$", proc.stdout, re.M)
        assert row, proc.stdout
        assert 0 <= float(row[1]) <= 1 and 0 <= float(row[2]) <= 1
    assert re.search(r"seed 0 length-disentangled .* length head -?[0-9.]+, accuracy", proc.stdout)
