"""Bad input never hurts `bigrm serve` or its other clients: each bad request is a 4xx with a one-line reason and the
server answers good requests afterwards; the API key, the body limit, a full queue (503, Retry-After), a client that
goes away, /metrics, and SIGTERM draining what is in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bigrm.inference.rewarder import Rewarder
from tests.helpers.paths import REPO
from tests.helpers.runs import free_port
from tests.helpers.serving import Server

GOOD = {"prompt": "p", "completions": [" a", " b"]}
MSG = [{"role": "user", "content": "hi"}]

BAD = [  # (path, body: bytes as sent, or JSON; status, words of the reason)
    ("/v1/rewards", b"{not json", 400, "malformed JSON"),
    ("/v1/rewards", b"", 400, "malformed JSON"),
    ("/v1/rewards", b"\xff\xfe", 400, "malformed JSON"),
    ("/v1/rewards", b'{"prompt": "p", "completions": [" a"]', 400, "malformed JSON"),
    ("/v1/rewards", [1, 2], 422, "must be a JSON object"),
    ("/v1/rewards", "text", 422, "must be a JSON object"),
    ("/v1/rewards", {"completions": [" a"]}, 422, "prompt: missing"),
    ("/v1/rewards", {"prompt": 3, "completions": [" a"]}, 422, "prompt: must be text or chat messages"),
    ("/v1/rewards", {"prompt": "p"}, 422, "completions: must be a non-empty list"),
    ("/v1/rewards", {"prompt": "p", "completions": []}, 422, "completions: must be a non-empty list"),
    ("/v1/rewards", {"prompt": "p", "completions": " a"}, 422, "completions: must be a non-empty list"),
    ("/v1/rewards", {"prompt": "p", "completions": [3]}, 422, "completions[0]: must be a non-empty string"),
    ("/v1/rewards", {"prompt": "p", "completions": ["  "]}, 422, "completions[0]: empty completion"),
    ("/v1/rewards", {"prompt": "p", "completions": [None]}, 422, "completions[0]"),
    ("/v1/rewards", {"prompt": "p", "completions": [[" s1"], " a"]}, 422, "all step lists"),
    ("/v1/rewards", {"prompt": "p", "completions": [[" s1", " "]]}, 422, "completions[0][1]: empty text"),
    ("/v1/rewards", {"prompt": "p", "completions": [MSG]}, 422, "need a chat-message prompt"),
    ("/v1/rewards", {"prompt": [{"role": "user"}], "completions": [" a"]}, 422, "needs string 'role' and 'content'"),
    ("/v1/rewards", {"prompt": [{"role": "bot", "content": "x"}], "completions": [" a"]}, 422, "not one of"),
    ("/v1/rewards", {"prompt": "p", "completions": [" a"], "extra": 1}, 422, "extra: unknown field"),
    ("/v1/rewards", {"prompt": "p", "completions": [" a"] * 9}, 413, "over --max_sequences=8"),
    ("/v1/rewards", {"prompt": "p", "completions": [" a"], "per_token": 1}, 422, "per_token: must be true or false"),
    ("/v1/rewards", {"groups": []}, 422, "groups: must be a non-empty list"),
    ("/v1/rewards", {"groups": [3]}, 422, "must be a JSON object"),
    ("/v1/rewards", {"groups": [GOOD] * 5}, 413, "over --max_sequences=8 completions in all"),
    ("/v1/rewards", {"prompt": "p", "completions": [" y" * 400]}, 422, "longer than data.max_length"),
    ("/get_reward", {}, 422, "query: must be a list of texts"),
    ("/get_reward", {"query": "one"}, 422, "query: must be a list of texts"),
    ("/get_reward", {"query": []}, 422, "query: empty list"),
    ("/get_reward", {"query": ["a", 5]}, 422, "query[1]: must be text"),
    ("/get_reward", {"query": ["a", ""]}, 422, "query[1]: empty text"),
    ("/get_reward", {"query": ["a"], "prompts": ["a", "b"]}, 422, "prompts: must be a list of 1 texts"),
    ("/get_reward", {"query": ["a"], "prompts": [7]}, 422, "prompts: must be texts"),
    ("/get_reward", {"query": ["a"] * 9}, 413, "over --max_sequences=8"),
    ("/classify", {"model": "rm"}, 422, "input: missing"),
    ("/classify", {"input": [1, "a"]}, 422, "input: mixed types"),
    ("/classify", {"input": [[1, 2], "a"]}, 422, "input: mixed types"),
    ("/classify", {"input": [1.5, 2]}, 422, "input: mixed types"),
    ("/classify", {"input": [[]]}, 422, "input[0]: empty token list"),
    ("/classify", {"input": [[1, 2], [3, True]]}, 422, "input[1]: token ids must be integers, got True"),
    ("/classify", {"input": [[1, 2.0]]}, 422, "input[0]: token ids must be integers"),
    ("/classify", {"input": [1, 10**9]}, 422, "token id 1000000000 is out of the vocabulary"),
    ("/pooling", {"input": [[5], [-1]]}, 422, "input[1]: token id -1 is out of the vocabulary"),
    ("/classify", {"input": [[1]] * 9}, 413, "input: 9 sequences, over --max_sequences=8"),
    ("/classify", {"input": [7] * 400}, 422, "longer than data.max_length"),
    ("/classify", {"input": 3}, 422, "input: must be a list of texts"),
    ("/classify", {"input": "x", "use_activation": "no"}, 422, "use_activation: must be true or false"),
    ("/pooling", {"input": []}, 422, "input: empty list"),
]


@pytest.fixture(scope="module")
def server(llama_dir):
    from dataclasses import replace

    rewarder = Rewarder(str(llama_dir))
    rewarder.configure(replace(rewarder.data, max_length=128), 256)
    server = Server(rewarder, max_sequences=8, max_body=4096, api_key="sekret")
    yield server
    server.close()


AUTH = {"Authorization": "Bearer sekret"}


def test_every_bad_request_is_a_one_line_4xx_and_the_server_lives_on(server):
    assert len(BAD) >= 30
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        for path, body, status, words in BAD:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = client.post(path, content=raw, headers={"content-type": "application/json"})
            reason = response.json()["error"]
            assert (response.status_code, words in reason) == (status, True), (path, body, reason)
            assert "\n" not in reason
        assert client.get("/health").status_code == 200
        good = client.post("/v1/rewards", json=GOOD)
        assert good.status_code == 200 and len(good.json()["rewards"]) == 2
        assert client.get("/v1/rewards").status_code == 405 and client.post("/nowhere", json={}).status_code == 404
        metrics = client.get("/metrics").text
    assert 'bigrm_requests_total{endpoint="/v1/rewards",code="422"}' in metrics
    assert 'bigrm_requests_total{endpoint="/v1/rewards",code="200"} 1' in metrics
    assert "bigrm_queue_sequences 0" in metrics and "bigrm_request_latency_seconds_bucket" in metrics


def test_api_key_and_body_limit(server):
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/health").status_code == 200  # a load balancer's probe needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "sekre"}):
            refused = client.post("/v1/rewards", json=GOOD, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert client.get("/metrics").status_code == 401
        assert client.post("/v1/rewards", json=GOOD, headers={"X-API-Key": "sekret"}).status_code == 200
        big = {"prompt": "p" * 5000, "completions": [" a"]}
        too_big = client.post("/v1/rewards", json=big, headers=AUTH)
        assert too_big.status_code == 413 and "over --max_body=4096" in too_big.json()["error"]

        def chunks():  # no Content-Length: the limit is counted as the body arrives
            for _ in range(10):
                yield b" " * 1000

        streamed = client.post("/v1/rewards", content=chunks(), headers=AUTH)
        assert streamed.status_code == 413 and "over --max_body=4096" in streamed.json()["error"]


def test_a_full_queue_is_503_with_retry_after_and_a_gone_client_frees_its_work(llama_dir):
    server = Server(Rewarder(str(llama_dir)), max_queue=4, batch_wait=0.6)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            with ThreadPoolExecutor(2) as pool:
                first = pool.submit(client.post, "/v1/rewards", json={"prompt": "p", "completions": [" a"] * 3})
                time.sleep(0.2)
                full = client.post("/v1/rewards", json=GOOD)
                assert full.status_code == 503 and full.headers["retry-after"] == "1"
                assert "queue full (--max_queue=4" in full.json()["error"]
                assert first.result().status_code == 200
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/rewards", json=GOOD, timeout=0.2)
            time.sleep(1.0)
            metrics = client.get("/metrics").text
            assert "bigrm_cancelled_requests_total 1" in metrics and "bigrm_queue_sequences 0" in metrics
            assert client.post("/v1/rewards", json=GOOD).status_code == 200
    finally:
        server.close()


def test_sigterm_answers_what_is_in_flight_and_exits_0(llama_dir):
    port = free_port()
    proc = started(port, "--model", str(llama_dir), "--batch_wait", "1.0")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, [url])
        with httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(4) as pool:
            bodies = [{"prompt": f"q{i}", "completions": [" a", " b"]} for i in range(4)]
            inflight = [pool.submit(client.post, "/v1/rewards", json=b) for b in bodies]
            time.sleep(0.4)  # sent, waiting for their batch
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in inflight]
        assert [a.status_code for a in answers] == [200] * 4
        assert all(len(a.json()["rewards"]) == 2 for a in answers)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read().decode()
    assert "bigrm serve: scalar reward model on http://127.0.0.1:" in out


def started(port: int, *args: str) -> subprocess.Popen:
    code = "import sys; from bigrm.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, "serve", *args, "--port", str(port), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_healthy(proc: subprocess.Popen, urls: list[str]) -> None:
    deadline = time.time() + 120
    for url in urls:
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode() if proc.poll() else ""
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)


def test_devices_start_one_replica_per_device_and_a_signal_drains_them_all(llama_dir):
    import psutil

    port = free_port()
    proc = started(port, "--model", str(llama_dir), "--devices", "cpu,cpu")
    urls = [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
    try:
        wait_healthy(proc, urls)
        replicas = psutil.Process(proc.pid).children()
        assert len(replicas) == 2
        answers = [httpx.post(url + "/v1/rewards", json=GOOD, timeout=30).json()["rewards"] for url in urls]
        assert answers[0] == pytest.approx(answers[1], abs=1e-6)  # the same model behind each port
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in replicas)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"bigrm serve: 2 replicas on ports {port}..{port + 1}" in proc.stdout.read().decode()


def test_a_replica_that_dies_stops_the_others_with_its_code(llama_dir):
    import psutil

    port = free_port()
    proc = started(port, "--model", str(llama_dir), "--devices", "cpu, cpu")
    try:
        wait_healthy(proc, [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"])
        first, second = psutil.Process(proc.pid).children()
        first.kill()
        assert proc.wait(60) == 128 + signal.SIGKILL
        second.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "exited with code -9: stopping the others" in proc.stdout.read().decode()
