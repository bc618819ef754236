"""Every error leaves as JSON {"error": {"code", "message", "request_id"}}.

One table maps each runtime error kind to its status; unexpected exceptions become a
500 that carries the request id (also logged), never a traceback.
"""

from __future__ import annotations

import logging
import math
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.schemas import ErrorResponse
from service.runtime import errors as rt
from service.runtime.engine import ReloadFailed

log = logging.getLogger("vqa.api")


class ApiError(Exception):
    """An error raised by the API layer itself (auth, content type, size)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


# runtime error kind -> (status, code); order matters only for subclasses.
STATUS = [
    (rt.BadImage, 400, "bad_image"),
    (rt.NotFound, 404, "not_found"),
    (rt.Conflict, 409, "conflict"),
    (rt.QueueFull, 503, "queue_full"),
    (rt.Unavailable, 503, "unavailable"),
    (rt.BatcherClosed, 503, "unavailable"),
    (rt.RequestTimeout, 504, "timeout"),
    (ReloadFailed, 500, "reload_failed"),
]


# What every route may answer besides its success, for OpenAPI (one JSON error shape).
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "Bad image: corrupt, unsupported format, zero size or too many pixels"),
        (401, "Missing or wrong API key (writes, when VQA_API_KEY is set)"),
        (404, "Unknown model, gallery, image id or route"),
        (409, "The gallery or image id exists already"),
        (413, "The body is over the limit"),
        (415, "The content type is not accepted"),
        (422, "The request does not match its schema"),
        (500, "Internal error or failed model batch; the message quotes the request id"),
        (503, "Queue full, starting or draining: retry after Retry-After seconds"),
        (504, "No result within the request timeout"),
    ]
}


def _retry_after(exc: Exception) -> str:
    return str(max(1, math.ceil(getattr(exc, "retry_after_s", 1.0))))


def new_request_id() -> str:
    return os.urandom(8).hex()  # 16 hex digits, a fifth of the cost of uuid4().hex[:16]


def request_id(request: Request) -> str:
    """The id the app's middleware gave this request (a new one if none did)."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = new_request_id()
    return rid


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "request_id": request_id(request)}}
    return JSONResponse(body, status_code=status, headers=headers)


def internal_error(request: Request, exc: BaseException) -> JSONResponse:
    """A 500 that names the request id (the log has the traceback under it)."""
    rid = request_id(request)
    log.error("request %s failed", rid, exc_info=exc)
    message = f"internal error; quote request id {rid} when reporting it"
    return error_response(request, 500, "internal", message)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(request, 422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(rt.ServiceError)
    @app.exception_handler(rt.BadImage)
    @app.exception_handler(rt.QueueFull)
    @app.exception_handler(rt.RequestTimeout)
    @app.exception_handler(rt.BatcherClosed)
    async def _runtime(request: Request, exc: Exception):
        for kind, status, code in STATUS:
            if isinstance(exc, kind):
                headers = {"Retry-After": _retry_after(exc)} if status == 503 else None
                return error_response(request, status, code, str(exc) or code, headers)
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return internal_error(request, exc)
