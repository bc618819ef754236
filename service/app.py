"""create_app(settings): routers, middleware, and the lifespan that loads models."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from service.api import galleries, ground, health, match, models, vqa
from service.api.errors import error_response, install_error_handlers, request_id
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
    for module in (vqa, match, ground, galleries, models, health):
        app.include_router(module.router)
    _install_middleware(app, settings, engine)
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
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        engine.metrics.requests.labels(path, str(response.status_code)).inc()
        response.headers["X-Request-ID"] = request.state.request_id
        return response


def run_server(args) -> None:
    """Entry of `vqa serve`: flags override VQA_* environment variables."""
    import uvicorn

    overrides = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command")
    }
    settings = Settings(**overrides)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
