"""create_app(settings): routers, middleware, and the lifespan that loads models."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import galleries, ground, health, match, models, page, vqa
from service.api.errors import (
    ERROR_RESPONSES,
    error_response,
    install_error_handlers,
    internal_error,
    new_request_id,
)
from service.config import Settings
from service.runtime.engine import Engine


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.torch_threads is not None:
            set_torch_threads(settings.torch_threads)
        await engine.start()
        try:
            yield
        finally:
            await engine.stop(drain_timeout=settings.drain_timeout_s)

    app = FastAPI(
        title="VQA service",
        version="0.1.0",
        description="Visual question answering, image-text matching, grounding and caption "
        "search on ViLBERT and LXMERT over Faster R-CNN regions.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    install_error_handlers(app)
    for module in (vqa, match, ground, galleries, models, health, page):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    app.add_middleware(
        RequestGate, max_body_bytes=settings.max_body_bytes, count=_count_requests(engine)
    )
    app.add_middleware(CancelOnDisconnect, on_cancel=_count_hang_up(engine))
    return app


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")


def _client_request_id(scope: Scope) -> str | None:
    """The caller's X-Request-ID (a proxy's, say), when it is a short plain token."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return value.decode() if _REQUEST_ID.fullmatch(value) else None
    return None


class RequestGate:
    """Plain ASGI middleware around every HTTP request: a request id (the caller's
    X-Request-ID when it is a short token, else a new one; in the scope's state
    for the error handlers, and as the X-Request-ID response header), the body-size limit
    (413 from Content-Length, and counted as the body streams, so a chunked body without
    one is stopped too), requests counted by route and status, and a 500 naming the
    request id for an exception no handler took.

    Plain ASGI, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs the
    rest of the app in a task group and pipes the response through a memory stream, a
    cost every request paid (`bench.batching --baseline`, concurrency 32: this gate and
    async dependencies gave 1.13x to 1.24x the answers per second, at 0.82x to 0.90x
    the server CPU per answer).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, count: Callable[[str, int], None]):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _client_request_id(scope) or new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        status: int | None = None  # set once a response starts
        received, too_large = 0, False

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode())]
            await send(message)

        async def app_send(message: Message) -> None:
            if not too_large:  # else the 413 below replaces whatever the app answers
                await send_with_id(message)

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    too_large = True
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        if _declared_length(scope) > self.max_body_bytes:
            response = self._too_large(scope)
        else:
            response = None
            try:
                await self.app(scope, counting_receive, app_send)
            except Exception as exc:  # a failed batch or a bug: 500 with the request id
                if status is not None:  # the response has started: nothing to replace
                    raise
                response = None if too_large else internal_error(Request(scope), exc)
            if too_large and status is None:
                response = self._too_large(scope)
        if response is not None:
            await response(scope, receive, send_with_id)
        self.count(getattr(scope.get("route"), "path", "unmatched"), status or 500)

    def _too_large(self, scope: Scope) -> Response:
        limit = self.max_body_bytes
        message = f"the body exceeds the limit of {limit} bytes"
        return error_response(Request(scope), 413, "payload_too_large", message)


class BodyTooLarge(Exception):
    """Raised into the app by RequestGate's receive() once the body passes the limit."""


def _declared_length(scope: Scope) -> int:
    """The Content-Length header (0 when absent; a malformed one counts as too large)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else sys.maxsize
    return 0


def _count_requests(engine: Engine) -> Callable[[str, int], None]:
    def count(route: str, status: int) -> None:
        engine.metrics.requests.labels(route, str(status)).inc()

    return count


def set_torch_threads(n: int) -> None:
    """torch's intra-op threads for the whole process; set before the worker's first op,
    since each thread takes the setting when it first runs one."""
    import torch

    torch.set_num_threads(n)


def _count_hang_up(engine: Engine) -> Callable[[Scope], None]:
    def count(scope: Scope) -> None:
        path = getattr(scope.get("route"), "path", "unmatched")
        engine.metrics.requests.labels(path, "499").inc()  # nginx's "client closed request"

    return count


class CancelOnDisconnect:
    """Cancel a request's handler when its client hangs up, so that its queued model work
    is dropped before it runs. Uvicorn reports a hang-up only to the app's next
    `receive()`, which a handler awaiting a model never calls: once the handler has read
    the whole body, this middleware calls it instead, and cancels the handler if the
    client leaves before the response starts.
    """

    def __init__(self, app: ASGIApp, on_cancel: Callable[[Scope], None] | None = None):
        self.app = app
        self.on_cancel = on_cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read, hung_up = asyncio.Event(), asyncio.Event()
        response_started = False

        async def app_receive():
            if body_read.is_set():  # the watcher owns receive() now
                await hung_up.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_read.set()
            return message

        async def app_send(message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        async def watch() -> None:
            await body_read.wait()
            await receive()  # returns on a hang-up, or once the response is complete
            hung_up.set()
            if not response_started:
                handler.cancel()

        handler = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # we were cancelled, not the handler
                raise
            if self.on_cancel is not None:
                self.on_cancel(scope)
        finally:
            watcher.cancel()


def run_server(args) -> None:
    """Entry of `vqa serve`: flags override VQA_* environment variables."""
    import uvicorn

    overrides = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command")
    }
    settings = Settings(**overrides)
    # Uvicorn drains on SIGTERM (stops accepting, waits for requests in flight up to the
    # drain timeout, runs the lifespan shutdown), then re-raises the signal; after such a
    # drain, exiting with status 0 is the truth.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
