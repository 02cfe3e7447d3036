"""The HTTP server: OpenAI's routes on FastAPI, the web chat page, health and metrics.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `GET
/health`, `GET /metrics` (Prometheus text), `GET /` (the chat page), `GET /openapi.json`.
Every error is OpenAI's `{"error": {...}}` with a 4xx status for a client's mistake:
validation failures are 400 (not FastAPI's 422) and name the parameter, a body over
`max_body_bytes` is 413, a full queue is 429 with Retry-After, a wrong key 401.

A stream is server-sent events, `data: {chunk}` lines ended by `data: [DONE]`; an error in
the middle of one is sent as an error chunk, then `[DONE]`. When a client disconnects,
Starlette stops the response's generator, which cancels the request's generations.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.serve.api import Choice, GenerationFailed, Job, Run, Service, record
from lmforge.serve.metrics import Metrics
from lmforge.serve.protocol import ApiError, ChatRequest, CompletionRequest, validation_error
from lmforge.serve.scheduler import Update

PUBLIC = ("/health", "/")  # no key needed: liveness, and the page (a browser cannot send a key to load it; its calls do)


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket (port 0: a free one), made with IPPROTO_TCP so that
    asyncio sets TCP_NODELAY on every connection it accepts. `socket.create_server` leaves
    the protocol 0, asyncio then leaves Nagle's algorithm on, and a small event waiting for
    the client's delayed ACK added about 40 ms to the first token of a kept-alive connection."""
    listener = socket.create_server((host, port))
    return socket.socket(listener.family, listener.type, socket.IPPROTO_TCP, fileno=listener.detach())


def create_app(service: Service, *, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The ASGI app; the scheduler's thread runs while the app does (FastAPI's lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.scheduler.start()
        try:
            yield
        finally:
            service.scheduler.stop()

    app = FastAPI(title="lmforge", summary="An OpenAI-compatible server for one lmforge model", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    metrics = Metrics(service)
    app.add_middleware(Gate, metrics=metrics, api_key=api_key, limit=max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if isinstance(e.__cause__, _TooLarge):  # a chunked body grew past the limit while FastAPI read it
            return _error(_too_large(max_body_bytes))
        if e.status_code == 404:
            return _error(ApiError(404, f"no route {request.method} {request.url.path}; see /openapi.json", None, "not_found"))
        if e.status_code == 405:
            return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}", None, "method_not_allowed"))
        if e.status_code == 400:  # FastAPI could not read the body (not JSON, or a form it cannot parse)
            return _error(ApiError(400, "the request body could not be read: send one JSON object with "
                                   "Content-Type: application/json", None, "invalid_body"))
        return _error(ApiError(e.status_code, str(e.detail)))

    @app.get("/health", summary="Liveness: the server answers and its scheduler runs")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.name, "running": service.scheduler.running, "queued": service.scheduler.queued}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", summary="The one model this server serves")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created, "owned_by": "lmforge"}]}

    @app.post("/v1/completions", summary="Continue prompts (OpenAI completions)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        job = service.completion_job(body)
        return await _answer(request, service, job, metrics, body.stream, CompletionChunks, service.completion_response)

    @app.post("/v1/chat/completions", summary="Answer a conversation in the model's chat template (OpenAI chat completions)")
    async def chat(body: ChatRequest, request: Request) -> Response:
        job = service.chat_job(body)
        return await _answer(request, service, job, metrics, body.stream, ChatChunks, service.chat_response)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("lmforge.serve").joinpath("static/index.html").read_text(encoding="utf-8"))

    return app


# --- answers ---------------------------------------------------------------------------------
def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _answer(request: Request, service: Service, job: Job, metrics: Metrics, stream: bool, chunks: type[Chunks],
                  shape: Callable[[Job, list[Choice]], dict[str, Any]]) -> Response:
    """A stream of server-sent events, or the whole answer in one body. The job is queued
    first, so a full queue is a plain 429, never a stream that breaks off."""
    started = time.monotonic()
    run = service.start(job, metrics.first_token(started))
    if stream:
        return StreamingResponse(events(chunks(service, job), run, metrics, started), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(_cancel_unless_done, run))
    return await _whole(request, job, run, metrics, started, shape)


async def _cancel_unless_done(run: Run) -> None:
    run.cancel_unless_done()


async def _whole(request: Request, job: Job, run: Run, metrics: Metrics, started: float,
                 shape: Callable[[Job, list[Choice]], dict[str, Any]]) -> Response:
    """Wait for the whole job and answer in one body; a client that hangs up cancels it."""
    choices = [Choice() for _ in job.generations]
    try:
        async for update in _watching(request, run.updates()):
            record(choices[update.index], update.emitted)
    except GenerationFailed as e:
        return _error(ApiError(500, str(e), None, "generation_failed", "server_error"))
    except ClientGone:
        return Response(status_code=499)
    metrics.finished(job, choices, started)
    return JSONResponse(shape(job, choices))


class ClientGone(Exception):
    pass


async def _watching(request: Request, run: AsyncIterator[Any], every: float = 0.25) -> AsyncIterator[Any]:
    """`run`'s items, but stop (closing `run`, which cancels the job) when the client
    disconnects, checked every `every` seconds however fast the items come."""
    nxt = asyncio.ensure_future(anext(run))
    checked = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=every)
            if time.monotonic() - checked >= every:
                if await request.is_disconnected():
                    raise ClientGone
                checked = time.monotonic()
            if not done:
                continue
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
            nxt = asyncio.ensure_future(anext(run))
    finally:
        if not nxt.done():
            nxt.cancel()  # the generator's own cleanup (cancelling the job) runs in that task
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await nxt
        await run.aclose()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def events(shape: Chunks, run: Run, metrics: Metrics, started: float) -> AsyncIterator[str]:
    """A job's answer as server-sent events: `shape`'s chunks as tokens arrive, the usage
    chunk if asked for, and `[DONE]`; a failure mid-stream is an error chunk, then `[DONE]`."""
    job = shape.job
    choices = [Choice() for _ in job.generations]
    try:
        for chunk in shape.opening():
            yield _sse(chunk)
        async for update in run.updates():
            for chunk in shape.on(update, choices[update.index]):
                yield _sse(chunk)
        if job.include_usage:
            yield _sse({**shape.head, "choices": [], "usage": shape.service.usage(job, choices)})
        metrics.finished(job, choices, started)
    except GenerationFailed as e:
        yield _sse(ApiError(500, str(e), None, "generation_failed", "server_error").body())
    yield "data: [DONE]\n\n"


class Chunks:
    """How one kind of answer is streamed: its opening chunks, and the chunks one update adds."""

    kind = ""

    def __init__(self, service: Service, job: Job) -> None:
        self.service, self.job = service, job
        self.head = service.head(job, self.kind)

    def opening(self) -> list[dict[str, Any]]:
        return []

    def on(self, update: Update, choice: Choice) -> list[dict[str, Any]]:
        raise NotImplementedError


class CompletionChunks(Chunks):
    """`text_completion` chunks; with echo, a choice's first chunk is its prompt (and the
    prompt's log-probabilities, which exist once it has been prefilled)."""

    kind = "text_completion"

    def __init__(self, service: Service, job: Job) -> None:
        super().__init__(service, job)
        self.echoed: set[int] = set()
        self.one_token = replace(job, echo=False)  # a streamed token's log-probs: no prompt entries before it

    def on(self, update: Update, choice: Choice) -> list[dict[str, Any]]:
        i, e, out = update.index, update.emitted, []
        if self.job.echo and i not in self.echoed:
            self.echoed.add(i)
            logprobs = None if self.job.logprobs is None else self.service.completion_logprobs(self.job, i, Choice())
            out.append(self._chunk(i, self.service.echo_text(self.job, i), logprobs, None))
        record(choice, e)
        logprobs = None
        if self.job.logprobs is not None and e.token is not None:
            logprobs = self.service.completion_logprobs(self.one_token, i, Choice(logprobs=[(e.token, e.logprob, e.top or [])]))
        if e.text or logprobs or e.finish_reason:
            out.append(self._chunk(i, e.text, logprobs, e.finish_reason))
        return out

    def _chunk(self, index: int, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {**self.head, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


class ChatChunks(Chunks):
    """`chat.completion.chunk`s: each choice opens with the role, then content deltas, then
    an empty delta with its finish_reason."""

    kind = "chat.completion.chunk"

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(len(self.job.generations))]

    def on(self, update: Update, choice: Choice) -> list[dict[str, Any]]:
        i, e, out = update.index, update.emitted, []
        record(choice, e)
        logprobs = None
        if self.job.logprobs is not None and e.token is not None:
            logprobs = {"content": self.service.chat_logprobs([(e.token, e.logprob, e.top or [])])}
        if e.text or logprobs:
            out.append(self._chunk(i, {"content": e.text}, logprobs=logprobs))
        if e.finish_reason is not None:
            out.append(self._chunk(i, {}, e.finish_reason))
        return out

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {**self.head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


# --- what every request passes first ----------------------------------------------------------------
class Gate:
    """Before a route runs: the body size limit (413 at once from Content-Length, or as soon
    as a chunked body grows past it), the API key (401), and the request count and latency
    for /metrics. Plain ASGI, so streams and disconnects pass through untouched."""

    def __init__(self, app: ASGIApp, metrics: Metrics, api_key: str | None, limit: int) -> None:
        self.app, self.metrics, self.limit = app, metrics, limit
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        status = 0

        async def tracking(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            declared = headers.get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                return await _send_error(tracking, _too_large(self.limit))
            if self.expected is not None and path not in PUBLIC:
                given = headers.get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    what = "no API key given" if not given else "the API key is wrong"
                    return await _send_error(tracking, ApiError(401, f"{what}: send the header 'Authorization: Bearer <key>'",
                                                                None, "invalid_api_key"))
            seen = 0

            async def limited() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:
                        raise _TooLarge
                return message

            await self.app(scope, limited, tracking)
        finally:
            self.metrics.request(path, status)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {limit:,} bytes", None, "body_too_large")


async def _send_error(send: Send, e: ApiError) -> None:
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
