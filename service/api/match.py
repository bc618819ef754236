"""POST /v1/match: how well each text describes one image."""

from fastapi import APIRouter, Request

from service.api.deps import EngineDep, read_image_request
from service.api.openapi import image_body
from service.api.schemas import MatchParams, MatchRequest, MatchResponse

router = APIRouter(tags=["inference"])


@router.post(
    "/v1/match",
    response_model=MatchResponse,
    openapi_extra=image_body(MatchRequest, list_field="texts", form_name="text"),
)
async def match(request: Request, engine: EngineDep) -> dict:
    """Score each text: the probability that it describes the image."""
    params, image = await read_image_request(request, MatchParams, "texts", "text")
    return await engine.match(image, params.texts, params.model)
