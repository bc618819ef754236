"""The demo page: GET / and the static files it loads (plain HTML, CSS and JS, no build).

Static files are served by one explicit route rather than a mounted app, so the page
travels with `app.include_router` like every other resource and 404s stay JSON errors.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.api.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# The page loads only its own files and talks only to this service.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded service never serves stale JS
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The demo page."""
    return FileResponse(STATIC_DIR / "index.html", headers=SECURITY_HEADERS)


@router.get("/static/{path:path}")
async def static_file(path: str) -> FileResponse:
    """A file under service/static/; anything outside it, or missing, is a 404."""
    file = (STATIC_DIR / path).resolve()
    if not file.is_relative_to(STATIC_DIR) or not file.is_file():
        raise ApiError(404, "not_found", f"no static file {path!r}")
    return FileResponse(file, headers=SECURITY_HEADERS)
