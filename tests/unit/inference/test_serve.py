"""`bigrm serve` on a real uvicorn server on loopback: its rewards are `bigrm score`'s for the same rows (every reward
kind, 32 clients at once), through bigrm's grouped endpoint, OpenRLHF's own remote-RM client and verl's /classify
request."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from bigrm import cli
from bigrm.inference.batching import MIN_SHARED, share_groups
from bigrm.inference.rewarder import Query, Rewarder
from tests.helpers.serving import Server, write_kind

PROMPTS = ["write a positive review:", "Q: add 2 and 3.", "\n\nHuman: hi\n\nAssistant:"]
COMPLETIONS = [" great superb", " awful", " the it was", " 5", " It is 7. I think", " hello there"]


def ranked_rows() -> list[dict]:
    rows = []
    for i, p in enumerate(PROMPTS * 4):
        k = 2 + i % 3
        rows.append({"prompt": p, "ranked_outputs": [COMPLETIONS[(i + j) % 6] + " x" * (i % 4) for j in range(k)]})
    return rows


def stepwise_rows() -> list[dict]:
    steps = [[" First 2.", " Then 3."], [" So 5."], [" It is", " seven", " done."]]
    return [{"prompt": p, "completions": steps[i % 3], "labels": [1] * len(steps[i % 3])}
            for i, p in enumerate(PROMPTS * 3)]  # fmt: skip


def scored(tmp_path, model_dir, rows, *flags) -> list[dict]:
    data, out = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.score_main(["--model", str(model_dir), "--data", str(data), "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def models(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return {
        "scalar": llama_dir,
        "steps": write_kind(llama_dir, root / "prm", "steps"),
        "attributes": write_kind(llama_dir, root / "heads", "attributes"),
    }


@pytest.fixture(scope="module")
def scalar_server(llama_dir):
    server = Server(Rewarder(str(llama_dir)))
    yield server
    server.close()


def concurrently(fn, items, clients: int = 32) -> list:
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(fn, items))


@pytest.mark.parametrize("kind", ["scalar", "steps", "attributes"])
def test_served_rewards_equal_bigrm_score_under_32_clients(tmp_path, models, kind):
    rows = stepwise_rows() if kind == "steps" else ranked_rows()
    expected = scored(tmp_path, models[kind], rows)
    server = Server(Rewarder(str(models[kind])))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            health = client.get("/health").json()
            assert health["kind"] == kind and health["status"] == "ok"

            def ask(row):
                completions = [row["completions"]] if kind == "steps" else row["ranked_outputs"]
                response = client.post("/v1/rewards", json={"prompt": row["prompt"], "completions": completions})
                assert response.status_code == 200, response.text
                return response.json()

            got = concurrently(ask, rows * 3)  # each row thrice: 36-54 requests from 32 clients at once
    finally:
        server.close()
    for answer, want in zip(got, expected * 3, strict=True):
        assert answer["rewards"] == pytest.approx(want["rewards"], abs=1e-5)
        if kind == "steps":
            assert answer["step_rewards"] == [pytest.approx(s, abs=1e-5) for s in want["step_rewards"]]
        if kind == "attributes":
            assert set(answer["attributes"]) == set(want["attributes"])
            for name, values in want["attributes"].items():
                assert answer["attributes"][name] == pytest.approx(values, abs=1e-5)


def test_openrlhf_client_and_verl_classify_get_the_scored_rewards(tmp_path, llama_dir, scalar_server):
    """OpenRLHF's own client (SingleTurnAgentExecutor._fetch_rewards_via_http) and verl's request and parsing
    (RewardLoopWorker.compute_score_disrm: {"model", "input", "use_activation": false}, data[-1].probs[-1])."""
    pytest.importorskip("aiohttp")
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    rows = ranked_rows()
    expected = [r for row in scored(tmp_path, llama_dir, rows) for r in row["rewards"]]
    prompts = [row["prompt"] for row in rows for _ in row["ranked_outputs"]]
    queries = [row["prompt"] + c for row in rows for c in row["ranked_outputs"]]
    executor = SingleTurnAgentExecutor(scalar_server.url + "/get_reward")
    (answer,) = asyncio.run(executor._fetch_rewards_via_http(queries, prompts, [None] * len(queries)))
    assert answer["rewards"] == pytest.approx(expected, abs=1e-5) and answer["scores"] == answer["rewards"]

    async def verl(text: str) -> float:  # verl/experimental/reward_loop/reward_loop.py, as it posts and reads
        import aiohttp

        payload = {"model": "rm", "input": text, "use_activation": False}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{scalar_server.url}/classify", json=payload) as resp:
                resp.raise_for_status()
                output = await resp.json()
        return output["data"][-1]["probs"][-1]

    async def all_verl():
        return await asyncio.gather(*(verl(q) for q in queries))

    assert asyncio.run(all_verl()) == pytest.approx(expected, abs=1e-5)
    with httpx.Client(base_url=scalar_server.url) as client:
        pooled = client.post("/pooling", json={"input": queries[:3], "use_activation": False}).json()
        assert [d["data"][0] for d in pooled["data"]] == pytest.approx(expected[:3], abs=1e-5)
        soft = client.post("/classify", json={"input": queries[0]}).json()["data"][0]["probs"][0]
        assert soft == pytest.approx(1 / (1 + np.exp(-expected[0])), abs=1e-6)  # vLLM's default: the activation


def test_classify_scores_token_ids_as_given(tmp_path, llama_dir, scalar_server):
    """vLLM's token-id inputs ([id, ...] or [[id, ...], ...]): the ids `bigrm score` lays out for a row get its
    reward; ids without the end token get it appended, as a text without it does (the convention's rule)."""
    rows = ranked_rows()[:3]
    expected = [r for row in scored(tmp_path, llama_dir, rows) for r in row["rewards"]]
    rewarder = scalar_server.app.state.batcher.rewarder
    texts = [row["prompt"] + c for row in rows for c in row["ranked_outputs"]]
    ids = [e.scored[0].ids for e in rewarder.encode([Query("", [t]) for t in texts])]
    eos = rewarder.tokenizer.eos_token_id
    assert all(i[-1] == eos for i in ids) and rewarder.data.reward_convention == "trl"
    with httpx.Client(base_url=scalar_server.url) as client:
        many = client.post("/classify", json={"input": ids, "use_activation": False}).json()
        assert [d["probs"][0] for d in many["data"]] == pytest.approx(expected, abs=1e-5)
        assert many["usage"]["prompt_tokens"] == sum(map(len, ids))
        one = client.post("/pooling", json={"input": ids[0][:-1], "use_activation": False}).json()
        assert one["data"][0]["data"][0] == pytest.approx(expected[0], abs=1e-5)
        other = client.post("/classify", json={"input": [ids[1][1:]], "use_activation": False}).json()
        assert other["data"][0]["probs"][0] != pytest.approx(expected[1], abs=1e-5)  # no BOS added: as given


def test_native_groups_and_chat_prompts(tmp_path, llama_dir, scalar_server):
    chat = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go away"}]
    want = scored(tmp_path, llama_dir, chat)[0]["rewards"]
    rows = ranked_rows()[:3]
    plain = [r["rewards"] for r in scored(tmp_path, llama_dir, rows)]
    body = {"groups": [{"prompt": chat[0]["prompt"], "completions": ["hello", "go away"]}]
            + [{"prompt": r["prompt"], "completions": r["ranked_outputs"]} for r in rows]}  # fmt: skip
    with httpx.Client(base_url=scalar_server.url) as client:
        groups = client.post("/v1/rewards", json=body).json()["groups"]
        assert groups[0]["rewards"] == pytest.approx(want, abs=1e-5)
        assert [g["rewards"] for g in groups[1:]] == [pytest.approx(p, abs=1e-5) for p in plain]
        assert all(g["cut"] == [0] * len(g["rewards"]) for g in groups)
        dup = client.post("/v1/rewards", json={"prompt": "p", "completions": [" same", " same"]}).json()
        assert dup["rewards"][0] == dup["rewards"][1]  # GRPO samples repeat; training data would refuse this
        per_token = scored(tmp_path, llama_dir, rows, "--per-token")
        body = {"groups": [{"prompt": r["prompt"], "completions": r["ranked_outputs"], "per_token": True} for r in rows]
                + [{"prompt": rows[0]["prompt"], "completions": rows[0]["ranked_outputs"]}]}  # fmt: skip
        groups = client.post("/v1/rewards", json=body).json()["groups"]
        for got, want in zip(groups, per_token, strict=False):
            assert [pytest.approx(v, abs=1e-5) for v in want["per_token_rewards"]] == got["per_token_rewards"]
            assert got["rewards"] == pytest.approx(want["rewards"], abs=1e-5)
        assert "per_token_rewards" not in groups[-1]


def test_overlong_completions_follow_data_overlong_and_prompts_are_cut(llama_dir):
    rewarder = Rewarder(str(llama_dir))
    from dataclasses import replace

    rewarder.configure(replace(rewarder.data, max_length=16, overlong="skip"), 64)
    server = Server(rewarder)
    try:
        with httpx.Client(base_url=server.url) as client:
            body = {"prompt": "a b c d e f g h i j k l m", "completions": [" ok", " z" * 40]}
            answer = client.post("/v1/rewards", json=body).json()
            assert answer["rewards"][1] is None and "longer than data.max_length=16" in answer["skipped"]["1"]
            assert answer["cut"][0] > 0 and answer["rewards"][0] is not None
            rewarder.configure(replace(rewarder.data, overlong="error"), 64)
            refused = client.post("/v1/rewards", json=body)
            assert refused.status_code == 422 and "completion 1: " in refused.json()["error"]
    finally:
        server.close()


def test_share_groups_joins_completions_of_one_prompt_within_the_budget():
    head = list(range(MIN_SHARED))
    seqs = [head + [50], [9] * 12, head + [60, 61], head[:-1] + [70, 71]]
    assert share_groups(seqs, [False] * 4, 100) == [[0, 2], [3], [1]]
    assert share_groups(seqs, [False, False, True, False], 100) == [[0], [3], [1], [2]]
    assert share_groups(seqs, [False] * 4, 15) == [[0], [2], [3], [1]]


def test_normalize_uses_the_recorded_reward_statistics(models, llama_dir):
    from bigrm.errors import ConfigError

    rewarder = Rewarder(str(models["attributes"]))
    query = [Query("p", [" a", " b c"])]
    raw = rewarder.score(rewarder.encode(query))[0]["rewards"]
    rewarder.configure(rewarder.data, normalize=True)
    normalised = rewarder.score(rewarder.encode(query))[0]["rewards"]
    assert normalised == pytest.approx([(r - 0.25) / 2.0 for r in raw], abs=1e-6)  # tests.helpers.serving's stats
    with pytest.raises(ConfigError, match="records no reward mean/std"):
        Rewarder(str(llama_dir)).configure(normalize=True)
    with pytest.raises(ConfigError, match="below data.max_length"):
        Rewarder(str(llama_dir)).configure(budget=100)
    assert cli.serve_main(["--help"]) == 0
