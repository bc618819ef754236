"""Dependencies as Annotated aliases, and reading a body as JSON or multipart."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.api.errors import ApiError
from service.config import Settings
from service.runtime.engine import Engine

P = TypeVar("P", bound=BaseModel)


# Async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread
# hop per dependency per request for what is an attribute lookup.
async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Gallery writes need `Authorization: Bearer <key>` when VQA_API_KEY is set."""
    if not settings.api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token, settings.api_key):
        raise ApiError(
            401,
            "unauthorized",
            "this call needs Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )


ApiKey = Depends(require_api_key)


def decode_base64_image(data: str, field: str = "image") -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_image", f"{field} is not valid base64") from None


def validate(model: type[P], data: Any) -> P:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def read_image_request(
    request: Request, params: type[P], list_field: str, form_name: str
) -> tuple[P, bytes]:
    """Parse a JSON body {image, ...} or multipart (file `image`, repeated `form_name`)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        body = await _json(request)
        if not isinstance(body, dict):
            raise RequestValidationError([_error("body", "expected a JSON object")])
        image = body.pop("image", None)
        if not isinstance(image, str) or not image:
            raise RequestValidationError([_error("image", "a base64 image is required")])
        return validate(params, body), decode_base64_image(image)
    if ctype == "multipart/form-data":
        return await _multipart(request, params, list_field, form_name)
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {ctype or 'none'} is not accepted; send application/json or "
        "multipart/form-data",
    )


async def read_json(request: Request, model: type[P]) -> P:
    """Parse a JSON-only body (415 for any other content type)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type {ctype or 'none'} is not accepted; send application/json",
        )
    return validate(model, await _json(request))


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise RequestValidationError([_error("body", "the body is not valid JSON")]) from None


async def _multipart(request: Request, params: type[P], list_field: str, form_name: str):
    try:
        form = await request.form(max_files=1, max_fields=64)
    except Exception as exc:  # malformed multipart
        raise RequestValidationError([_error("body", f"bad multipart body: {exc}")]) from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise RequestValidationError([_error("image", "a file field named image is required")])
    data: dict[str, Any] = {list_field: form.getlist(form_name)}
    for key, value in form.multi_items():
        if key not in ("image", form_name):
            data[key] = value
    return validate(params, data), await upload.read()


def _error(loc: str, msg: str) -> dict:
    return {"loc": ("body", loc), "msg": msg, "type": "value_error"}
