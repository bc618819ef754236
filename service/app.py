"""create_app(settings): routers, middleware, and the lifespan that loads models."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import galleries, ground, health, match, models, page, vqa
from service.api.errors import (
    ERROR_RESPONSES,
    error_response,
    install_error_handlers,
    internal_error,
    request_id,
)
from service.config import Settings
from service.runtime.engine import Engine


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
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
    _install_middleware(app, settings, engine)
    app.add_middleware(CancelOnDisconnect, on_cancel=_count_hang_up(engine))
    return app


def _install_middleware(app: FastAPI, settings: Settings, engine: Engine) -> None:
    @app.middleware("http")
    async def limit_and_count(request: Request, call_next):
        request_id(request)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            response = error_response(
                request,
                413,
                "payload_too_large",
                f"the body exceeds the limit of {settings.max_body_bytes} bytes",
            )
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # a failed batch or a bug: 500 with the request id
                response = internal_error(request, exc)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        engine.metrics.requests.labels(path, str(response.status_code)).inc()
        response.headers["X-Request-ID"] = request.state.request_id
        return response


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
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
