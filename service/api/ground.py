"""POST /v1/ground: the region each referring expression picks out."""

from fastapi import APIRouter

from service.api.deps import EngineDep, decode_base64_image
from service.api.schemas import GroundRequest, GroundResponse

router = APIRouter(tags=["inference"])


@router.post("/v1/ground", response_model=GroundResponse)
async def ground(body: GroundRequest, engine: EngineDep) -> dict:
    """Ground each expression to one detected region's box."""
    image = decode_base64_image(body.image)
    return await engine.ground(image, body.expressions, body.model)
