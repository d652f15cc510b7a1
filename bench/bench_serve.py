"""`bigrm serve` against a plain padded transformers server of the kind OpenRLHF's serve_rm.py is, on GRPO-shaped
load: each request one prompt's G completions, sent to OpenRLHF's `/get_reward` (both servers speak it).

    python bench/bench_serve.py [--gs 8 16] [--groups 32] [--clients 4] [--threads 2]
    python bench/bench_serve.py --soak 20000 [--soak-clients 64]
    python bench/bench_serve.py --replicas 24 --gs 8

Data: HH harmless-base prompts (../shared/data) with G HH replies each; a query is prompt + reply + EOS, as
OpenRLHF's rollout decodes it. Model: a random-initialised Llama of --shape (bench/models.py's tiny config widened),
fp32, the same directory for both. Each server is a child process with --threads torch threads, started alone
(the machine has 2 cores):
  bigrm   bigrm serve: queued requests batched under --budget tokens, each group's prompt encoded once, packed
          without padding
  plain   FastAPI + uvicorn; per request: tokenise (add_special_tokens=False), pad to the longest, one forward of
          AutoModelForSequenceClassification, the value at the last real token: OpenRLHF's RewardModelProxy with
          its default batch size (the whole request)
--clients threads send the --groups requests (after 2 warm-up requests) as fast as answers come, --repeats times per
server, alternating; the median run counts. Reported per G: sequences/s, request latency p50/p99, the ratio
bigrm / plain, and the largest difference between the two servers' rewards (the same scores, or the comparison
means nothing).
--soak N: N requests from --soak-clients threads against bigrm serve alone (tiny model): errors, answers that are
not their request's, the server's RSS after warm-up and at the end, and its exit code after SIGTERM.
--replicas N: N requests (G = --gs[0]) against one bigrm serve with 1 thread, then against two with 1 thread each,
dealt round-robin (a load balancer's part): sequences/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from bench_speed import hh_pieces
from fastapi import Request  # at module level: FastAPI resolves the endpoint's annotation here
from models import write_config

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    # wide enough that the forward, not the framework around it, is what a request costs
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
    "tiny": {},
}  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain_server(model: str, port: int, threads: int) -> None:
    """OpenRLHF's serve_rm.py, reduced to what it computes: tokenise, pad, forward, the last real token."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    rm = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model)
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        queries = (await request.json())["query"]
        batch = tok(queries, return_tensors="pt", add_special_tokens=False, padding=True, truncation=True,
                    max_length=1024)  # fmt: skip
        with torch.no_grad():
            rewards = rm(**batch).logits[:, 0].tolist()
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start(which: str, model: str, threads: int, budget: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if which == "bigrm":
        code = "import sys; from bigrm.cli import main; sys.exit(main())"
        cmd = [sys.executable, "-c", code, "serve", "--model", model, "--port", str(port), "--threads", str(threads),
               "--max_tokens_per_batch", str(budget)]  # fmt: skip
    else:
        cmd = [sys.executable, __file__, "--plain-server", model, str(port), str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{which} server did not start")


def load(urls: list[str], bodies: list[dict], clients: int) -> tuple[float, list[float], list[list[float]]]:
    """(wall seconds, per-request latency, per-request rewards) of sending every body from `clients` threads, the
    requests dealt round-robin over the servers at `urls`."""
    with httpx.Client(timeout=600) as client:
        for url in urls:
            for body in bodies[:2]:  # warm-up
                client.post(url + "/get_reward", json=body).raise_for_status()

        def one(i):
            t = time.perf_counter()
            response = client.post(urls[i % len(urls)] + "/get_reward", json=bodies[i])
            response.raise_for_status()
            return time.perf_counter() - t, response.json()["rewards"]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            out = list(pool.map(one, range(2, len(bodies))))
        return time.perf_counter() - t0, [o[0] for o in out], [o[1] for o in out]


def replicas(model: str, bodies: list[dict], clients: int, budget: int) -> dict:
    """Sequences/s of one bigrm serve with 1 thread against two, each with 1 thread, requests dealt between them."""
    out = {}
    for n in (1, 2):
        procs = [start("bigrm", model, 1, budget) for _ in range(n)]
        try:
            wall, _, _ = load([url for _, url in procs], bodies, clients)
        finally:
            for proc, _ in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        out[f"{n}x1_seq_per_s"] = sum(len(b["query"]) for b in bodies[2:]) / wall
    out["scaling"] = out["2x1_seq_per_s"] / out["1x1_seq_per_s"]
    return out


def grpo_bodies(g: int, n: int, eos: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    prompts, replies = hh_pieces(400, 300)
    bodies = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        outs = rng.sample(replies, g)
        bodies.append({"query": [prompt + r + eos for r in outs], "prompts": [prompt] * g})
    return bodies


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(model: str, n: int, clients: int, threads: int, budget: int, eos: str) -> dict:
    """`n` requests from `clients` threads, each a random pick of 256 distinct GRPO groups (G = 4) whose rewards were
    taken one request at a time first: errors, answers not those of their request, server RSS after warm-up and
    at the end."""
    bodies = grpo_bodies(4, 256, eos, seed=1)
    proc, url = start("bigrm", model, threads, budget)
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            expected = [client.post("/get_reward", json=b).json()["rewards"] for b in bodies]
            warm = rss_mb(proc.pid)
            picks = random.Random(2).choices(range(len(bodies)), k=n)
            limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
            with httpx.Client(base_url=url, timeout=600, limits=limits) as pool_client:

                def one(i):
                    try:
                        response = pool_client.post("/get_reward", json=bodies[i])
                    except httpx.HTTPError:
                        return "error"
                    if response.status_code != 200:
                        return "error"
                    got = response.json()["rewards"]
                    return "ok" if np.allclose(got, expected[i], atol=1e-5, rtol=0) else "mixed"

                t0 = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    outcomes = list(pool.map(one, picks))
                wall = time.perf_counter() - t0
        end = rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    return {"requests": n, "clients": clients, "errors": outcomes.count("error"), "mixed": outcomes.count("mixed"),
            "requests_per_s": n / wall, "rss_after_warmup_mb": warm, "rss_end_mb": end, "exit_code": code}  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["--plain-server"]:
        plain_server(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gs", type=int, nargs="+", default=[8, 16], help="completions per prompt")
    ap.add_argument("--groups", type=int, default=32, help="requests (GRPO groups) per measurement")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    ap.add_argument("--budget", type=int, default=16384, help="bigrm serve --max_tokens_per_batch")
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each server, alternating; the median counts")
    ap.add_argument("--out", type=str, default=None, help="also write the figures as JSON here")
    ap.add_argument("--soak", type=int, default=0, help="instead: this many requests from --soak-clients (tiny model)")
    ap.add_argument("--soak-clients", type=int, default=64)
    ap.add_argument("--replicas", type=int, default=0, help="instead: 1 x 1 thread against 2 x 1 on this many groups")
    args = ap.parse_args()
    if args.soak:
        args.shape = "tiny"

    from transformers import AutoTokenizer

    from bigrm.model.reward_model import write_random_init

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    src = write_config("tiny", tmp / "src")
    config = json.loads((src / "config.json").read_text())
    config.update(SHAPES[args.shape])
    (src / "config.json").write_text(json.dumps(config))
    model = str(tmp / "model")
    write_random_init(str(src), model, 0)
    eos = AutoTokenizer.from_pretrained(model).eos_token
    if args.soak:
        out = soak(model, args.soak, args.soak_clients, args.threads, args.budget, eos)
        print(json.dumps(out))
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "soak": out}, indent=2) + "\n")
        return
    if args.replicas:
        out = replicas(model, grpo_bodies(args.gs[0], args.replicas + 2, eos, seed=3), args.clients, args.budget)
        print(json.dumps(out))
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "replicas": out}, indent=2) + "\n")
        return
    results = []
    for g in args.gs:
        bodies = grpo_bodies(g, args.groups + 2, eos, seed=g)
        row, rewards = {"G": g}, {}
        runs = {"bigrm": [], "plain": []}
        for _ in range(args.repeats):  # alternating: the machine's other load hits both alike
            for which in runs:
                proc, url = start(which, model, args.threads, args.budget)
                try:
                    wall, lat, rewards[which] = load([url], bodies, args.clients)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
                runs[which].append((wall, lat))
        n = sum(len(b["query"]) for b in bodies[2:])
        for which, measured in runs.items():
            wall, lat = sorted(measured, key=lambda m: m[0])[len(measured) // 2]  # the median run
            row[which] = {"seq_per_s": n / wall, "p50_s": float(np.percentile(lat, 50)),
                          "p99_s": float(np.percentile(lat, 99)),
                          "all_seq_per_s": [n / m[0] for m in measured]}  # fmt: skip
        row["speedup"] = row["bigrm"]["seq_per_s"] / row["plain"]["seq_per_s"]
        flat = [np.asarray(rewards[w], dtype=object) for w in ("bigrm", "plain")]
        row["max_reward_diff"] = max(abs(a - b) for x, y in zip(*flat, strict=True) for a, b in zip(x, y, strict=True))
        results.append(row)
        b, p = row["bigrm"], row["plain"]
        print(
            f"G={g:3d}  bigrm {b['seq_per_s']:7.1f} seq/s  p50 {b['p50_s']:.3f}s p99 {b['p99_s']:.3f}s | plain "
            f"{p['seq_per_s']:7.1f} seq/s  p50 {p['p50_s']:.3f}s p99 {p['p99_s']:.3f}s | {row['speedup']:.2f}x  "
            f"max |Δreward| {row['max_reward_diff']:.1e}",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
