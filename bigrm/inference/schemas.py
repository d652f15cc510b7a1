"""The request bodies `bigrm serve` reads, each checked into Queries with a one-line reason when it cannot be, and the
response each API's client parses:

  native    POST /v1/rewards  {"prompt": text | messages, "completions": [text | messages | [step, ...]],
            "per_token": false} → {"rewards", "values", "cut", the kind's "attributes" / "step_rewards", and with
            per_token "per_token_rewards"}; or {"groups": [those]}
            → {"groups": [answers]}
  OpenRLHF  POST /get_reward  {"query": [text], "prompts": [text], "labels": [...]} → {"rewards", "scores",
            "extra_logs"}: what openrlhf/cli/serve_rm.py answers and openrlhf/utils/agent.py's
            SingleTurnAgentExecutor._fetch_rewards_via_http reads (OpenRLHF 0.11)
  vLLM      POST /classify and /pooling  {"model", "input": text | [text] | [id] | [[id]], "use_activation" |
            "activation"} (token ids scored as given, vLLM's CompletionRequestMixin.input)
            → {"data": [{"index", "probs" | "data", ...}], "usage"}: vLLM's classification and pooling responses,
            as verl's reward loop reads them (`output["data"][-1]["probs"][-1]`, RewardLoopWorker.compute_score_disrm)
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from bigrm.data.examples import check_messages, completion, is_messages
from bigrm.inference.rewarder import Query

MAX_TEXT = 1 << 20  # characters of one text; longer is refused before tokenising


class BadRequest(ValueError):
    """A body that cannot be scored (HTTP 4xx, one line); `status` its code."""

    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.status = status


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name}: must be text, got {type(value).__name__}")
    if not value.strip():
        raise BadRequest(f"{name}: empty text")
    if len(value) > MAX_TEXT:
        raise BadRequest(f"{name}: {len(value)} characters, over {MAX_TEXT}", 413)
    return value


def _texts(value: Any, name: str, limit: int, allow_one: bool = False) -> list[str]:
    if allow_one and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise BadRequest(f"{name}: must be a list of texts, got {type(value).__name__}")
    if not value:
        raise BadRequest(f"{name}: empty list")
    if len(value) > limit:
        raise BadRequest(f"{name}: {len(value)} sequences, over --max_sequences={limit}", 413)
    return [_text(v, f"{name}[{i}]") for i, v in enumerate(value)]


def _prompt(value: Any, name: str) -> str | list[dict]:
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else _text(value, name)
    if is_messages(value):
        problem = check_messages(value, name)
        if problem:
            raise BadRequest(f"{name}: {problem}")
        return value
    raise BadRequest(f"{name}: must be text or chat messages, got {type(value).__name__}")


def native_queries(body: Any, limit: int) -> tuple[list[Query], bool]:
    """(queries, whether they came as {"groups": [...]})."""
    body = _object(body)
    if "groups" in body:
        groups = body["groups"]
        if not isinstance(groups, list) or not groups:
            raise BadRequest("groups: must be a non-empty list of {prompt, completions} objects")
        queries = [_group(_object(g), f"groups[{i}].", limit) for i, g in enumerate(groups)]
        if sum(len(q.completions) for q in queries) > limit:
            raise BadRequest(f"groups: over --max_sequences={limit} completions in all", 413)
        return queries, True
    return [_group(body, "", limit)], False


def _group(body: dict, at: str, limit: int) -> Query:
    unknown = set(body) - {"prompt", "completions", "per_token"}
    if unknown:
        raise BadRequest(f"{at}{sorted(unknown)[0]}: unknown field (a group has prompt, completions, per_token)")
    per_token = body.get("per_token", False)
    if not isinstance(per_token, bool):
        raise BadRequest(f"{at}per_token: must be true or false, got {per_token!r}")
    if "prompt" not in body:
        raise BadRequest(f"{at}prompt: missing")
    prompt = _prompt(body["prompt"], f"{at}prompt")
    raw = body.get("completions")
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"{at}completions: must be a non-empty list, got {type(raw).__name__ if raw != [] else '[]'}")
    if len(raw) > limit:
        raise BadRequest(f"{at}completions: {len(raw)} sequences, over --max_sequences={limit}", 413)
    stepwise = [isinstance(c, list) and all(isinstance(s, str) for s in c) and bool(c) for c in raw]
    if any(stepwise):
        if not all(stepwise):
            raise BadRequest(f"{at}completions: all step lists ([step, ...]) or none")
        steps = [[_text(s, f"{at}completions[{k}][{j}]") for j, s in enumerate(c)] for k, c in enumerate(raw)]
        return Query(prompt, ["".join(s) for s in steps], steps, per_token)
    completions = []
    for k, c in enumerate(raw):
        name = f"{at}completions[{k}]"
        value, problem = completion(c, name)
        if problem:
            raise BadRequest(f"{name}: {problem}")
        if isinstance(value, list) and not isinstance(prompt, list):
            raise BadRequest(f"{name}: chat-message completions need a chat-message prompt")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            _text(value, name)
        completions.append(value)
    return Query(prompt, completions, per_token=per_token)


def openrlhf_queries(body: Any, limit: int, whole) -> list[Query]:
    """Each query alone (its prompt, when `prompts` gives one it starts with, marks where the response starts);
    `whole`: the rewarder's whole_text."""
    body = _object(body)
    queries = _texts(body.get("query"), "query", limit)
    prompts = body.get("prompts")
    if prompts is not None:
        if not isinstance(prompts, list) or len(prompts) != len(queries):
            raise BadRequest(f"prompts: must be a list of {len(queries)} texts, one per query")
        if not all(isinstance(p, str) for p in prompts):
            raise BadRequest("prompts: must be texts")
    out = []
    for i, q in enumerate(queries):
        q = whole(q)
        p = prompts[i] if prompts else ""
        p = p if p and q.startswith(p) and len(p) < len(q) else ""
        out.append(Query(p, [q[len(p) :]]))
    return out


def openrlhf_response(answers: list[dict]) -> dict:
    rewards = [a["rewards"][0] for a in answers]
    logs = {"cut": [a["cut"][0] for a in answers]}
    return {"rewards": rewards, "scores": rewards, "extra_logs": logs}


def vllm_queries(body: Any, limit: int, whole) -> tuple[list[Query], bool]:
    """(each input alone, whether to apply the activation); vLLM's `use_activation` (older: `activation`)."""
    body = _object(body)
    if "input" not in body:
        raise BadRequest("input: missing (vLLM's pooling API takes text or a list of texts)")
    raw = body["input"]
    ids = _token_lists(raw, limit)
    if ids is not None:
        queries = [Query("", [""], ids=i) for i in ids]
    else:
        queries = [Query("", [whole(t)]) for t in _texts(raw, "input", limit, allow_one=True)]
    activation = body.get("use_activation", body.get("activation", True))
    if not isinstance(activation, bool) and activation is not None:
        raise BadRequest(f"use_activation: must be true or false, got {activation!r}")
    return queries, activation is not False


def _is_id(x: Any) -> bool:
    return type(x) is int  # JSON's true/false are not token ids


def _token_lists(raw: Any, limit: int) -> list[list[int]] | None:
    """vLLM's token-id inputs: one list of ids, or a list of them; None when `raw` holds no ids (texts)."""
    if not isinstance(raw, list) or not raw or all(isinstance(x, str) for x in raw):
        return None
    if all(_is_id(x) for x in raw):
        raw = [raw]
    elif not all(isinstance(x, list) for x in raw):
        raise BadRequest("input: mixed types (give a text, a list of texts, token ids, or a list of token-id lists)")
    if len(raw) > limit:
        raise BadRequest(f"input: {len(raw)} sequences, over --max_sequences={limit}", 413)
    for i, ids in enumerate(raw):
        if not ids:
            raise BadRequest(f"input[{i}]: empty token list")
        if not all(_is_id(x) for x in ids):
            bad = next(x for x in ids if not _is_id(x))
            raise BadRequest(f"input[{i}]: token ids must be integers, got {bad!r}")
    return raw


def _activated(values: list[float]) -> list[float]:
    """vLLM's default pooler activation: sigmoid of one logit, softmax over several."""
    if len(values) == 1:
        return [1 / (1 + math.exp(-values[0]))]
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def vllm_response(answers: list[dict], tokens: int, model: str, activation: bool, pooling: bool) -> dict:
    data = []
    for i, a in enumerate(answers):
        v = a["values"][0]  # None: skipped (data.overlong: skip)
        values = None if v is None else [float(x) for x in (v if isinstance(v, list) else [v])]
        values = _activated(values) if activation and values else values
        if pooling:
            data.append({"index": i, "object": "pooling", "data": values})
        else:
            data.append({"index": i, "label": None, "probs": values, "num_classes": len(values)})
    kind = "pool" if pooling else "classify"
    return {
        "id": f"{kind}-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }
