"""Liveness, readiness and Prometheus metrics."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import EngineDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(engine: EngineDep):
    """200 once models are loaded and workers run; 503 before and while draining."""
    if engine.ready:
        return {"status": "ready"}
    body = {"error": {"code": "unavailable", "message": engine.state}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(engine: EngineDep) -> Response:
    """Prometheus metrics: requests, queue depth, batch sizes, latency per stage."""
    return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)
