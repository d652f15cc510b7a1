"""`bigrm serve --devices A,B,…`: one server process per device, on consecutive ports from --port, for any HTTP load
balancer to spread requests over (README: Serving the reward model).

Each replica is `bigrm serve` itself with its --device and --port (its own model copy, queue and scoring thread),
started in its own session so that only this process decides when it stops: SIGTERM or SIGINT here is passed to
every replica, which drains what it has in flight. The first replica to fail stops the others, and its exit code is
this process's; when all drain cleanly it is 0.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

MAIN = "import sys; from bigrm.cli import main; sys.exit(main())"
TAKEN = {"--devices", "--device", "--port"}  # set per replica


def replica_argv(argv: list[str], device: str, port: int) -> list[str]:
    """`bigrm serve`'s arguments for one replica: `argv` without --devices, --device and --port, then its own."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in TAKEN:
            skip = True  # its value follows
        elif arg.split("=", 1)[0] not in TAKEN:
            out.append(arg)
    return [*out, "--device", device, "--port", str(port)]


def run(argv: list[str], devices: list[str], port: int) -> int:
    """Serve with one replica per device until a signal (then 0 once all drained) or a replica's failure (its code)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MAIN, "serve", *replica_argv(argv, d, port + i)], start_new_session=True
        )
        for i, d in enumerate(devices)
    ]
    stopping, first = [], []  # signals received; the first failed replica's exit code

    def forward(signum, frame) -> None:
        stopping.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # a replica drains on SIGTERM, whichever signal came here

    kept = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(p.poll() is None for p in procs):
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is not None and not stopping:
                code = procs[failed].returncode
                first.append(code if code > 0 else 128 - code)  # -N: ended by signal N
                print(
                    f"bigrm serve: the replica on {devices[failed]} (port {port + failed}) exited with code "
                    f"{procs[failed].returncode}: stopping the others",
                    file=sys.stderr,
                    flush=True,
                )
                forward(signal.SIGTERM, None)
            time.sleep(0.1)
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
    return first[0] if first else next((p.returncode for p in procs if p.returncode), 0)
