"""`bigrm serve`: a reward model over HTTP (FastAPI on uvicorn), speaking the schemas RL trainers send
(bigrm.inference.schemas), its requests batched dynamically (bigrm.inference.batching).

Every failure a client causes is a 4xx with {"error": one line}: a body over --max_body (413), malformed JSON (400),
a body of the wrong shape or a completion that cannot be scored (422), a missing or wrong API key (401); a full
queue is a 503 with Retry-After. SIGTERM stops accepting, answers what is in flight, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from bigrm.inference import schemas
from bigrm.inference.batching import Batcher, QueueFull
from bigrm.inference.rewarder import QueryError, Rewarder
from bigrm.inference.schemas import BadRequest


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body: int = 16 << 20  # bytes of one request body
    max_sequences: int = 1024  # sequences one request may send
    max_queue: int = 8192  # sequences waiting to be scored; more: 503
    batch_wait: float = 0.002  # seconds a batch waits for requests sent together
    model_name: str = "bigrm"


class Unauthorised(Exception):
    pass


def _authorise(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("x-api-key") or ""
    bearer = request.headers.get("authorization", "")
    if bearer.lower().startswith("bearer "):
        given = bearer[7:].strip()
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise Unauthorised


async def _read_json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"body of {declared} bytes, over --max_body={limit}", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"body over --max_body={limit} bytes", 413)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadRequest(f"malformed JSON: {reason}", 400) from None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answers(request: Request, batcher: Batcher, encoded) -> list[dict] | None:
    """The batcher's answers, or None when the client went away first (its queued work is then dropped)."""
    work = asyncio.ensure_future(batcher.submit(encoded))
    gone = asyncio.ensure_future(_until_disconnect(request))
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    return None


def _error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


class Service:
    """What the endpoints share: the rewarder, the batcher and the options; `handle` turns every failure into its
    status and counts each request in the metrics."""

    def __init__(self, rewarder: Rewarder, opts: ServeOptions) -> None:
        self.rewarder, self.opts = rewarder, opts
        self.batcher = Batcher(rewarder, opts.max_queue, opts.batch_wait)

    async def handle(self, request: Request, endpoint: str, parse, respond) -> JSONResponse:
        """`parse`: body → (queries, what `respond` needs besides); `respond`: (answers, encoded, that) → body."""
        start, status = time.perf_counter(), 200
        try:
            _authorise(request, self.opts.api_key)
            queries, extra = parse(await _read_json(request, self.opts.max_body))
            encoded = await asyncio.to_thread(self.rewarder.encode, queries)
            answers = await _answers(request, self.batcher, encoded)
            if answers is None:
                status = 499  # nginx's "client closed request": nobody reads this response
                return _error(status, "client disconnected")
            return JSONResponse(respond(answers, encoded, extra))
        except (BadRequest, QueryError) as err:
            status = getattr(err, "status", 422)
            return _error(status, str(err))
        except Unauthorised:
            status = 401
            return _unauthorised()
        except QueueFull:
            status = 503
            return _error(status, f"queue full (--max_queue={self.opts.max_queue} sequences)", {"Retry-After": "1"})
        except Exception as err:
            status = 500
            return _error(status, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        finally:
            self.batcher.metrics.request(endpoint, status, time.perf_counter() - start)

    def route(self, path: str, parse, respond):
        async def endpoint(request: Request):
            return await self.handle(request, path, parse, respond)

        return endpoint

    async def health(self):
        if self.batcher.stopping:
            return _error(503, "shutting down")
        r = self.rewarder
        return {"status": "ok", "kind": r.kind.name, "reward_convention": r.data.reward_convention,
                "max_length": r.data.max_length, "max_tokens_per_batch": r.budget}  # fmt: skip

    async def metrics(self, request: Request):
        try:
            _authorise(request, self.opts.api_key)
        except Unauthorised:
            return _unauthorised()
        text = self.batcher.metrics.text(self.batcher.queued)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def _unauthorised() -> JSONResponse:
    return _error(401, "missing or wrong API key", {"WWW-Authenticate": "Bearer"})


def create_app(rewarder: Rewarder, opts: ServeOptions) -> FastAPI:
    service = Service(rewarder, opts)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        yield
        service.batcher.stop()  # uvicorn has answered every request in flight by now

    app = FastAPI(title="bigrm serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = service.batcher
    limit, whole = opts.max_sequences, rewarder.whole_text

    def native(answers, encoded, grouped):
        return {"groups": answers} if grouped else answers[0]

    def openrlhf(answers, encoded, _):
        return schemas.openrlhf_response(answers)

    routes = [
        ("/v1/rewards", lambda b: schemas.native_queries(b, limit), native),
        ("/get_reward", lambda b: (schemas.openrlhf_queries(b, limit, whole), None), openrlhf),
    ]
    for path, pooling in (("/classify", False), ("/pooling", True), ("/v1/classify", False), ("/v1/pooling", True)):
        routes.append((path, lambda b: schemas.vllm_queries(b, limit, whole), _vllm_respond(pooling, opts.model_name)))
    for path, parse, respond in routes:
        app.add_api_route(path, service.route(path, parse, respond), methods=["POST"])
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/metrics", service.metrics, methods=["GET"])
    return app


def _vllm_respond(pooling: bool, model: str):
    def respond(answers, encoded, activation):
        tokens = sum(len(s.ids) for e in encoded for s in e.scored)
        return schemas.vllm_response(answers, tokens, model, activation, pooling)

    return respond


def run(rewarder: Rewarder, opts: ServeOptions) -> None:
    """Serve until SIGTERM or SIGINT; after SIGTERM, once what was in flight is answered, return (exit 0)."""
    import signal

    import uvicorn

    app = create_app(rewarder, opts)
    config = uvicorn.Config(
        app, host=opts.host, port=opts.port, log_level="info", access_log=False, timeout_graceful_shutdown=60
    )
    # uvicorn raises the signal it stopped on again once drained, under the handler it found: a SIGTERM that
    # has been honoured is then a clean exit, not death by the signal
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
