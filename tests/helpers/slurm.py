"""A fake Slurm (srun, scontrol, deepspeed stand-ins) for running slurm/train.sbatch without a cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.helpers.paths import REPO

SCRIPT = REPO / "slurm" / "train.sbatch"


RECIPE = REPO / "bigrm" / "recipes" / "tiny.yaml"


SRUN = r"""#!/bin/bash
echo "srun $*" >&2
nodes=1
while [ "${1#--}" != "$1" ]; do
    case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac
    shift
done
pids=()
for ((i = 0; i < nodes; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i "$@" &
    pids+=($!)
done
status=0  # like srun: the highest exit code of the tasks
for pid in "${pids[@]}"; do
    wait "$pid" || { code=$?; [ "$code" -gt "$status" ] && status=$code; }
done
exit "$status"
"""


SCONTROL = r"""#!/bin/bash
case $1 in
    show) printf '%s\n' $FAKE_HOSTS ;;
    requeue) echo "$2" >>"$SLURM_SUBMIT_DIR/requeued" ;;
esac
"""


DEEPSPEED = r"""#!/bin/bash
echo "deepspeed $*"
if [ -n "${RUN_UNTIL_ASKED:-}" ]; then  # a run that takes steps until asked to stop, then saves and exits 75
    touch "running-$SLURM_NODEID"
    while [ ! -e "$RUN_UNTIL_ASKED" ]; do sleep 0.05; done
    exit 75
fi
exit "${EXIT_STATUS:-0}"
"""


def fake_slurm(tmp: Path, hosts: list[str], gpus: int, deepspeed: bool = True, **env: str) -> dict[str, str]:
    """The environment of a batch job on `hosts` (job 1234, submitted from tmp/submit); with deepspeed=False the
    real launcher runs (tmp/submit/launch is the repository's)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": SRUN, "scontrol": SCONTROL, **({"deepspeed": DEEPSPEED} if deepspeed else {})}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    submit = tmp / "submit"
    submit.mkdir()
    (submit / "launch").symlink_to(REPO / "launch")
    return {
        # a rendezvous port left by an in-process run (or a user's shell) would override the job's
        **{k: v for k, v in os.environ.items() if k != "MASTER_PORT"},
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(submit),
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "fake[1-2]",
        "SLURM_GPUS_ON_NODE": str(gpus),
        "FAKE_HOSTS": " ".join(hosts),
        "CONFIG": str(RECIPE),
        **env,
    }
