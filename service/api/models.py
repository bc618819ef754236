"""GET /v1/models: what this service can answer with; POST .../reload: serve a new version."""

from typing import Annotated

from fastapi import APIRouter, Path

from service.api.deps import ApiKey, EngineDep
from service.api.schemas import ModelInfo

ModelName = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")]

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=list[ModelInfo])
async def list_models(engine: EngineDep) -> list[dict]:
    """Every loaded backbone model with its detector and metrics, from the manifests."""
    return engine.list_models()


@router.post("/v1/models/{name}/reload", response_model=ModelInfo, dependencies=[ApiKey])
async def reload_model(name: ModelName, engine: EngineDep) -> dict:
    """Serve the model store's newest version of `name` in place of the loaded one.

    Requests already running finish on the old version; later ones get the new one.
    Galleries bound to the old version are re-indexed onto the new one from their stored
    region features (searches use the old version until then) before this returns.
    Returns the version now served (unchanged if the store has nothing newer). 409 when the
    new version reads another detector's regions than galleries hold; 500 reload_failed
    when it cannot load (the old one keeps serving) or a gallery could not be re-indexed
    (it keeps searching with the old version; reloading again retries).
    """
    return await engine.reload(name)
