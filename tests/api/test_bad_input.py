"""Bad input of every kind gets its 4xx and error code, never a 500."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from service.app import create_app
from tests.support import LiveServer, make_settings, png_bytes

GOOD = base64.b64encode(png_bytes(0)).decode()


def _img(fmt: str, size=(32, 32), mode="RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def client(tiny_store, tmp_path_factory):
    store, _ = tiny_store
    settings = make_settings(
        store,
        tmp_path_factory.mktemp("data"),
        max_body_bytes=200_000,
        max_image_pixels=256 * 256,
        api_key="s3cret",
    )
    with LiveServer(create_app(settings)) as live, httpx.Client(base_url=live.url) as c:
        yield c


CASES = [
    # (name, method, path, kwargs, status, code)
    (
        "corrupt image",
        "post",
        "/v1/vqa",
        {"json": {"image": base64.b64encode(b"not an image").decode(), "questions": ["q"]}},
        400,
        "bad_image",
    ),
    (
        "truncated png",
        "post",
        "/v1/vqa",
        {"json": {"image": base64.b64encode(png_bytes(0)[:80]).decode(), "questions": ["q"]}},
        400,
        "bad_image",
    ),
    (
        "unsupported format",
        "post",
        "/v1/vqa",
        {"json": {"image": _img("ICO"), "questions": ["q"]}},
        400,
        "bad_image",
    ),
    (
        "too many pixels",
        "post",
        "/v1/vqa",
        {"json": {"image": _img("PNG", (300, 300)), "questions": ["q"]}},
        400,
        "bad_image",
    ),
    (
        "invalid base64",
        "post",
        "/v1/vqa",
        {"json": {"image": "@@@", "questions": ["q"]}},
        400,
        "bad_image",
    ),
    (
        "empty question",
        "post",
        "/v1/vqa",
        {"json": {"image": GOOD, "questions": [""]}},
        422,
        "invalid_request",
    ),
    (
        "blank question",
        "post",
        "/v1/vqa",
        {"json": {"image": GOOD, "questions": ["   "]}},
        422,
        "invalid_request",
    ),
    (
        "no questions",
        "post",
        "/v1/vqa",
        {"json": {"image": GOOD, "questions": []}},
        422,
        "invalid_request",
    ),
    (
        "too many questions",
        "post",
        "/v1/vqa",
        {"json": {"image": GOOD, "questions": ["q"] * 33}},
        422,
        "invalid_request",
    ),
    (
        "question too long",
        "post",
        "/v1/vqa",
        {"json": {"image": GOOD, "questions": ["x" * 257]}},
        422,
        "invalid_request",
    ),
    (
        "top_k zero",
        "post",
        "/v1/vqa",
        {"json": {"image": GOOD, "questions": ["q"], "top_k": 0}},
        422,
        "invalid_request",
    ),
    (
        "top_k eleven",
        "post",
        "/v1/vqa",
        {"json": {"image": GOOD, "questions": ["q"], "top_k": 11}},
        422,
        "invalid_request",
    ),
    ("missing image", "post", "/v1/vqa", {"json": {"questions": ["q"]}}, 422, "invalid_request"),
    (
        "unknown field",
        "post",
        "/v1/vqa",
        {"json": {"image": GOOD, "questions": ["q"], "colour": 1}},
        422,
        "invalid_request",
    ),
    (
        "not json",
        "post",
        "/v1/vqa",
        {"content": b"{oops", "headers": {"content-type": "application/json"}},
        422,
        "invalid_request",
    ),
    ("json array", "post", "/v1/vqa", {"json": ["q"]}, 422, "invalid_request"),
    (
        "wrong content type",
        "post",
        "/v1/vqa",
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    (
        "multipart without file",
        "post",
        "/v1/vqa",
        {"data": {"question": "q"}, "files": {"other": ("a.txt", b"x")}},
        422,
        "invalid_request",
    ),
    (
        "body over the limit",
        "post",
        "/v1/vqa",
        {"json": {"image": "A" * 300_000, "questions": ["q"]}},
        413,
        "payload_too_large",
    ),
    (
        "unknown model",
        "post",
        "/v1/vqa",
        {"json": {"image": GOOD, "questions": ["q"], "model": "nope"}},
        404,
        "not_found",
    ),
    (
        "unknown version",
        "post",
        "/v1/match",
        {"json": {"image": GOOD, "texts": ["t"], "model": "tiny-vilbert@99"}},
        404,
        "not_found",
    ),
    (
        "bad model name",
        "post",
        "/v1/match",
        {"json": {"image": GOOD, "texts": ["t"], "model": "../etc"}},
        422,
        "invalid_request",
    ),
    (
        "empty texts",
        "post",
        "/v1/match",
        {"json": {"image": GOOD, "texts": []}},
        422,
        "invalid_request",
    ),
    (
        "ground no expressions",
        "post",
        "/v1/ground",
        {"json": {"image": GOOD, "expressions": []}},
        422,
        "invalid_request",
    ),
    (
        "ground form body",
        "post",
        "/v1/ground",
        {"data": {"expressions": "x"}},
        422,
        "invalid_request",
    ),
    ("unknown gallery", "get", "/v1/galleries/nothere", {}, 404, "not_found"),
    ("bad gallery name", "get", "/v1/galleries/Bad%20Name", {}, 422, "invalid_request"),
    (
        "search unknown gallery",
        "post",
        "/v1/galleries/nothere/search",
        {"json": {"caption": "a red circle"}},
        404,
        "not_found",
    ),
    (
        "search k zero",
        "post",
        "/v1/galleries/nothere/search",
        {"json": {"caption": "a", "k": 0}},
        422,
        "invalid_request",
    ),
    ("gallery write without key", "put", "/v1/galleries/g1", {"json": {}}, 401, "unauthorized"),
    (
        "gallery write wrong key",
        "put",
        "/v1/galleries/g1",
        {"json": {}, "headers": {"authorization": "Bearer nope"}},
        401,
        "unauthorized",
    ),
    ("unknown route", "get", "/v1/nothing", {}, 404, "not_found"),
    ("wrong method", "get", "/v1/vqa", {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(
    "name, method, path, kwargs, status, code", CASES, ids=[c[0] for c in CASES]
)
def test_bad_input(client, name, method, path, kwargs, status, code):
    r = client.request(method.upper(), path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["message"]
    assert r.headers["x-request-id"] == err["request_id"]


def test_api_key_lets_gallery_writes_through(client):
    auth = {"authorization": "Bearer s3cret"}
    assert client.put("/v1/galleries/keyed", json={}, headers=auth).status_code == 201
    assert client.delete("/v1/galleries/keyed").status_code == 401
    assert client.delete("/v1/galleries/keyed", headers=auth).status_code == 204
