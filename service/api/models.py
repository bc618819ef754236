"""GET /v1/models: what this service can answer with."""

from fastapi import APIRouter

from service.api.deps import EngineDep
from service.api.schemas import ModelInfo

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=list[ModelInfo])
async def list_models(engine: EngineDep) -> list[dict]:
    """Every loaded backbone model with its detector and metrics, from the manifests."""
    return engine.list_models()
