"""POST /v1/vqa: answers to questions about one image."""

from fastapi import APIRouter, Request

from service.api.deps import EngineDep, read_image_request
from service.api.openapi import image_body
from service.api.schemas import VqaParams, VqaRequest, VqaResponse

router = APIRouter(tags=["inference"])


@router.post(
    "/v1/vqa",
    response_model=VqaResponse,
    openapi_extra=image_body(VqaRequest, list_field="questions", form_name="question"),
)
async def vqa(request: Request, engine: EngineDep) -> dict:
    """Answer each question about the image; regions are the detector's, answers best first."""
    params, image = await read_image_request(request, VqaParams, "questions", "question")
    return await engine.vqa(image, params.questions, params.model, params.top_k)
