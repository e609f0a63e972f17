"""The HTTP API in OpenAI's format (FastAPI): `POST /v1/chat/completions` (streamed as server-sent events
or whole), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus) and the web chat page at `/` (with
its icon at `/favicon.ico`).
Requests go to the `Engine`; a client that disconnects cancels its request and frees its slots."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mambavl.engine.scheduler import Delta, Engine, Failed, Finished, QueueFull
from mambavl.engine.scheduler import Request as EngineRequest
from mambavl.serve.connections import OVER_CAPACITY, ConnectionLimits
from mambavl.serve.images import ImagePolicy, PreparedImages, RequestError, decode, fetch_image_bytes
from mambavl.serve.metrics import Metrics
from mambavl.serve.schema import SYSTEM_MESSAGES, ChatRequest, conversation_prompt


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "mambavl"  # the id /v1/models lists and responses carry
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    max_body_bytes: int = 16 * 2**20
    default_max_tokens: int = 256
    max_tokens: int = 2048  # the most a request may ask for
    images: ImagePolicy = field(default_factory=ImagePolicy)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    # System text the model's prompt format has no slot for: "fold" it into the user's message, or "refuse"
    system_messages: str = "fold"
    # MiB of prepared images kept by their bytes (`serve.images.PreparedImages`); 0 keeps none
    image_cache_mb: float = 256.0

    def __post_init__(self):
        if not self.image_cache_mb >= 0:
            raise ValueError(f"image_cache_mb={self.image_cache_mb} is invalid: it must be ≥ 0 MiB")
        if self.system_messages not in SYSTEM_MESSAGES:
            raise ValueError(
                f"system_messages={self.system_messages!r}: expected one of {', '.join(SYSTEM_MESSAGES)}"
            )


log = logging.getLogger("mambavl.serve")
# OpenAI's error types: `invalid_request_error` is for the client's mistakes (4xx) only
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


def error(status: int, message: str, close: bool = False) -> JSONResponse:
    """An error response in OpenAI's format; `close` ends the connection after it."""
    kind = "server_error" if status >= 500 else ERROR_TYPES.get(status, "invalid_request_error")
    # Messages quote what the client sent, which may hold a lone surrogate: escape it, never fail on it.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"message": message, "type": kind, "code": status}
    headers = {"Connection": "close"} if close else None
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class Limits:
    """ASGI middleware: refuses bodies over the limit (413) or slower than the deadline (408) and
    connections over the cap (503), answers an unhandled exception with a 500 in OpenAI's format, and
    counts every response by route and status."""

    def __init__(self, app, max_body: int, body_timeout: float, metrics: Metrics):
        self.app, self.max_body, self.body_timeout, self.metrics = app, max_body, body_timeout, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status: dict = {"code": 500, "started": False}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status.update(code=message["status"], started=True)
            await send(message)

        try:
            await self._answer(scope, receive, counting_send, status)
        finally:
            self.metrics.http_responses.labels(route=route, status=str(status["code"])).inc()

    async def _answer(self, scope, receive, send, status: dict) -> None:
        body, refusal = await self._read_body_in_time(scope, receive)
        if refusal is not None:
            # A slow client is cut off. One whose body is refused may send the rest (dropped unread, up to
            # the body deadline) so that it reads this answer instead of a reset connection.
            code, why = refusal
            return await error(code, why, close=code == 408)(scope, receive, send)
        if scope.get("state", {}).get(OVER_CAPACITY):  # answered once its body is in, then closed
            message = "the server has too many open connections; retry shortly"
            return await error(503, message, close=True)(scope, receive, send)
        replayed = False

        async def replay():  # the buffered body first, then the client's own messages (disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        except Exception as e:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if status["started"]:
                raise  # the response has begun: uvicorn closes the connection
            message = f"internal error ({type(e).__name__}) while handling the request; the server goes on"
            await error(500, message)(scope, replay, send)

    async def _read_body_in_time(self, scope, receive) -> tuple[bytes, tuple[int, str] | None]:
        try:
            return await asyncio.wait_for(self._read_body(scope, receive), self.body_timeout)
        except asyncio.TimeoutError:
            why = f"the request body did not arrive within {self.body_timeout:g} s of its headers"
            return b"", (408, why)

    async def _read_body(self, scope, receive) -> tuple[bytes, tuple[int, str] | None]:
        """The whole body (at most `max_body` bytes are ever held), or the reason it is refused."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return b"", (400, f"Content-Length {declared!r} is not a number")
            if size > self.max_body:
                return b"", (413, f"the request body is {size:,} bytes; the limit is {self.max_body:,}")
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", (400, "the client went away before sending its body")
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_body:
                return b"", (413, f"the request body is over the limit of {self.max_body:,} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


ROUTES = ("/", "/favicon.ico", "/health", "/metrics", "/v1/models", "/v1/chat/completions")


def _prepare(vlm, data: bytes, policy: ImagePolicy, name: str):
    """An image's bytes decoded (within the policy's limits) and prepared for the model, digest included."""
    return vlm.preprocess(decode(data, policy, name))


def create_app(engine: Engine, config: ServeConfig | None = None) -> FastAPI:
    """The server's app around a started or unstarted engine (the app's lifespan starts and stops it)."""
    config = config or ServeConfig()
    metrics = engine.metrics or Metrics(engine.config.slots)
    engine.metrics = metrics

    async def lifespan(app):
        app.state.mailbox = Mailbox(asyncio.get_running_loop())
        if not engine.running:
            await asyncio.to_thread(engine.start)
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="mambavl", lifespan=lifespan, docs_url=None, redoc_url=None)
    prepared_images = PreparedImages(int(config.image_cache_mb * 2**20))
    app.add_middleware(
        Limits,
        max_body=config.max_body_bytes,
        body_timeout=config.connections.body_timeout,
        metrics=metrics,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                why = e.get("ctx", {}).get("error", e.get("msg"))
                return error(400, f"the body is not valid JSON: {why}")
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {e.get('msg')}")
        return error(400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        cause = exc.__cause__  # FastAPI's "error parsing the body" hides why: invalid UTF-8, nesting, ...
        if exc.status_code == 400 and cause is not None:
            return error(400, f"the body is not valid JSON: {type(cause).__name__}: {cause}")
        return error(exc.status_code, str(exc.detail))

    def authorised(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), config.api_key.encode()):
            raise HTTPException(401, "a valid API key is needed: send `Authorization: Bearer <key>`")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        html = (resources.files("mambavl.serve") / "web" / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers=PAGE_HEADERS)

    @app.get("/favicon.ico")
    async def icon():  # browsers ask for it on every page of the server, the JSON ones too
        return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.running else "stopped", "model": config.model_name, **engine.stats()}
        return JSONResponse(body, status_code=200 if engine.running else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def list_models():
        card = {"id": config.model_name, "object": "model", "created": STARTED, "owned_by": "mambavl"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat(body: ChatRequest, request: Request):
        broken = lone_surrogate(body.model_dump(exclude_none=True))
        if broken:
            return error(400, broken)
        try:
            job, events = await submit(body)
        except RequestError as e:
            return error(e.status, str(e))
        except QueueFull as e:
            return error(503, str(e))
        except RuntimeError as e:  # the engine is stopping or stopped
            return error(503, f"{e}; see /health")
        first = await next_event(events, request, job)
        if first is None:  # the client left while the request waited
            return Response(status_code=499)
        if isinstance(first, Failed):
            return error(first.status, first.message)
        reply = Reply(config.model_name, body.n, first.prompt_tokens, first.cached_tokens)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream(reply, events, job, usage), media_type="text/event-stream", headers=NO_BUFFERING
            )
        while not reply.complete:
            event = await next_event(events, request, job)
            if event is None:
                return Response(status_code=499)
            if isinstance(event, Failed):
                return error(event.status, event.message)
            reply.add(event)
        return reply.completion()

    async def submit(body: ChatRequest) -> tuple[EngineRequest, asyncio.Queue]:
        why = body.unsupported()
        if why:
            raise RequestError(why)
        if body.model not in (None, config.model_name):
            raise RequestError(f"this server serves {config.model_name!r}, not {body.model!r}", 404)
        asked = body.max_completion_tokens or body.max_tokens or 0
        if asked > config.max_tokens:
            raise RequestError(f"max_tokens={asked} is over the server's limit of {config.max_tokens}")
        if body.n > engine.config.slots:
            raise RequestError(f"n={body.n} is over the server's {engine.config.slots} slots")
        try:
            prompt, urls = conversation_prompt(engine.vlm, body.messages, config.system_messages)
            if len(urls) > 1:
                raise RequestError(
                    f"{len(urls)} images were sent; this model takes one image per conversation"
                )
            engine.check_prompt(prompt)  # its length in characters, before any work in proportion to it
            params = body.sampling(min(config.default_max_tokens, config.max_tokens))
        except RequestError:
            raise
        except ValueError as e:
            raise RequestError(str(e)) from e
        image = None
        if urls:  # decoded and transformed in a worker thread, beside the engine's decoding, once per image
            data, name = await fetch_image_bytes(urls[0], config.images)
            key = await run_in_threadpool(PreparedImages.key, data)
            image = prepared_images.get(key)
            metrics.image_cache.labels(result="miss" if image is None else "hit").inc()
            if image is None:
                image = await run_in_threadpool(_prepare, engine.vlm, data, config.images, name)
                prepared_images.put(key, image)
        try:  # tokenized and checked against the model's length in a worker thread, before it is queued
            tokens = await run_in_threadpool(engine.encode, prompt, image)
        except ValueError as e:
            raise RequestError(str(e)) from e
        events: asyncio.Queue = asyncio.Queue()
        mailbox = app.state.mailbox
        job = EngineRequest(
            image, prompt, params, sink=lambda event: mailbox.post(events, event), n=body.n, tokens=tokens
        )
        engine.submit(job)
        return job, events

    async def next_event(events: asyncio.Queue, request: Request, job: EngineRequest):
        """The next engine event, or None (and the job cancelled) if the client disconnects meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(job)
                    return None
            except asyncio.CancelledError:
                engine.cancel(job)
                raise

    async def stream(
        reply: Reply, events: asyncio.Queue, job: EngineRequest, usage: bool
    ) -> AsyncIterator[str]:
        try:
            for index in range(reply.n):
                yield sse(reply.chunk(index, {"role": "assistant", "content": ""}))
            while not reply.complete:
                batch = [await events.get()]
                while not events.empty():  # what arrived meanwhile goes out in one write
                    batch.append(events.get_nowait())
                out, failed = [], False
                for event in merge_deltas(batch):
                    if isinstance(event, Failed):
                        body = {"message": event.message, "type": "server_error", "code": event.status}
                        out.append(sse({"error": body}))
                        failed = True
                        break
                    reply.add(event)
                    if isinstance(event, Delta):
                        out.append(sse(reply.chunk(event.index, {"content": event.text})))
                    elif isinstance(event, Finished):
                        out.append(sse(reply.chunk(event.index, {}, event.reason)))
                yield "".join(out)
                if failed:
                    break
            if usage and reply.complete:
                yield sse(reply.chunk_usage())
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or the stream ended
            engine.cancel(job)

    return app


class Mailbox:
    """Engine events into the event loop's queues with one wake-up of the loop per burst, not one per
    event (64 streams make 64 events a step)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, object]] = []
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, event) -> None:
        with self.lock:
            self.pending.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for queue, event in items:
            queue.put_nowait(event)


def lone_surrogate(value, where: str = "") -> str | None:
    """Where a string in a request holds half of a UTF-16 pair (JSON allows "\\ud800" alone; no
    tokenizer or UTF-8 encoder does), as an error message, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return (
                f"{where or 'a string'} holds a lone surrogate (U+{ord(value[e.start]):04X}) at character "
                f"{e.start}: text must be valid Unicode; send characters outside the BMP as a surrogate pair"
            )
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip(".")
        found = lone_surrogate(item, inner)
        if found:
            return found
    return None


def merge_deltas(events: list) -> list:
    """Consecutive text deltas of one choice as one (fewer, larger chunks when a client lags behind)."""
    out: list = []
    for event in events:
        if isinstance(event, Delta) and out and isinstance(out[-1], Delta) and out[-1].index == event.index:
            out[-1] = Delta(event.index, out[-1].text + event.text)
        else:
            out.append(event)
    return out


STARTED = int(time.time())
# The page is one self-contained file: the browser may load nothing from elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; connect-src 'self'",
    "X-Content-Type-Options": "nosniff",
}
# The page's icon: an "m" on the page's accent colour (SVG, which browsers take whatever the file's name).
FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" '
    'fill="#2f6fde"/><path d="M7 23V12l4.5 6 4.5-6 4.5 6 4.5-6v11" fill="none" stroke="#fff" '
    'stroke-width="3" stroke-linecap="round" stroke-linejoin="round"/></svg>'
)
NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Characters that JSON leaves raw but that line readers built on `str.splitlines` (httpx's `aiter_lines`,
# among others) take for line breaks: escaped, so that an answer holding one cannot cut an event in two.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: dict) -> str:
    """One server-sent event: the payload as JSON on a single line, whatever its text holds."""
    return f"data: {json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


class Reply:
    """A response being assembled from engine events."""

    def __init__(self, model: str, n: int, prompt_tokens: int, cached_tokens: int = 0):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.n, self.prompt_tokens, self.cached_tokens = model, n, prompt_tokens, cached_tokens
        self.texts = [""] * n
        self.reasons: list[str | None] = [None] * n
        self.tokens = [0] * n

    @property
    def complete(self) -> bool:
        return all(r is not None for r in self.reasons)

    def add(self, event) -> None:
        if isinstance(event, Delta):
            self.texts[event.index] += event.text
        elif isinstance(event, Finished):
            self.reasons[event.index] = event.reason
            self.tokens[event.index] = event.tokens

    def usage(self) -> dict:
        done = sum(self.tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
            # the prompt's positions resumed from the prefix-state cache (OpenAI's field for cache hits)
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, index: int, delta: dict, reason: str | None = None) -> dict:
        choice = {"index": index, "delta": delta, "finish_reason": reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def chunk_usage(self) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage()}

    def completion(self) -> dict:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
            for i, (t, r) in enumerate(zip(self.texts, self.reasons, strict=True))
        ]
        return {**self._head("chat.completion"), "choices": choices, "usage": self.usage()}
