"""The demo page: its files over HTTP, its samples, and the page itself in headless Chromium.

The browser tests drive Debian's chromium through Playwright against the real app with tiny
random models on a live port, and check what a user sees against what the API answers.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.app import create_app
from service.data import shapes
from tests.api.page_samples import SAMPLES_DIR, build_samples
from tests.support import TINY_ANSWERS, LiveServer, make_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
API_KEY = "page-test-key"


@pytest.fixture(scope="module")
def server(tiny_store, tmp_path_factory):
    app = create_app(make_settings(tiny_store[0], tmp_path_factory.mktemp("page-data")))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scene_png() -> bytes:
    """A 160x96 shapes scene: not square, so a box drawn with the wrong scale shows."""
    scene = shapes.scene_from_objects(
        [
            {"shape": "circle", "color": "red", "box": [12, 20, 44, 52], "size": "large"},
            {"shape": "rectangle", "color": "blue", "box": [96, 40, 130, 70], "size": "large"},
        ],
        size=(160, 96),
    )
    buf = io.BytesIO()
    shapes.render(scene).save(buf, format="PNG")
    return buf.getvalue()


# -- the files -----------------------------------------------------------------------
def test_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path, ctype in [
        ("/static/app.js", "javascript"),
        ("/static/app.css", "text/css"),
        ("/static/samples/index.json", "application/json"),
        ("/static/samples/test-000003.png", "image/png"),
    ]:
        r = client.get(path)
        assert r.status_code == 200, path
        assert ctype in r.headers["content-type"], path
    assert "/" not in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "path", ["/static/nothing.js", "/static/", "/static/samples", "/static/%2e%2e/app.py"]
)
def test_static_serves_nothing_outside_its_files(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_samples_are_the_shapes_world_scenes_they_claim():
    built = build_samples()
    shipped = {p.name for p in SAMPLES_DIR.iterdir()}
    assert shipped == set(built)
    index = json.loads((SAMPLES_DIR / "index.json").read_text())
    assert index == json.loads(built["index.json"])
    assert len(index["samples"]) == 6
    for sample in index["samples"]:
        assert 2 <= len(sample["objects"]) <= 4
        assert sample["questions"] and sample["refexps"] and sample["captions"]
        shipped_px = np.asarray(Image.open(SAMPLES_DIR / sample["file"]).convert("RGB"))
        built_px = np.asarray(Image.open(io.BytesIO(built[sample["file"]])).convert("RGB"))
        assert np.array_equal(shipped_px, built_px), sample["file"]


# -- the page in a browser -----------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (the dev extra)")
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        message = "the browser tests need " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """Open the page of a server; fails the test on any uncaught JavaScript error."""
    pages, errors = [], []

    def _open(url: str):
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(20_000)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready=true]")
        pages.append(page)
        return page

    yield _open
    for page in pages:
        page.close()
    assert errors == []


def act(page, button: str) -> None:
    """Click an action's button and wait until its call has come back."""
    from playwright.sync_api import expect

    page.click(button)
    expect(page.locator(button)).to_be_enabled()


def rect(page, selector: str, nth: int = 0) -> dict:
    return page.locator(selector).nth(nth).bounding_box()


def assert_box_drawn_at(page, selector: str, nth: int, box: list[float], natural: tuple) -> None:
    """The element covers `box` (image pixels) scaled to the image as shown, to 1 px."""
    img, drawn = rect(page, "#image"), rect(page, selector, nth)
    sx, sy = img["width"] / natural[0], img["height"] / natural[1]
    expected = [img["x"] + box[0] * sx, img["y"] + box[1] * sy, box[2] - box[0], box[3] - box[1]]
    got = [drawn["x"], drawn["y"], drawn["width"] / sx, drawn["height"] / sy]
    assert got[:2] == pytest.approx(expected[:2], abs=1.0)
    assert got[2:] == pytest.approx(expected[2:], abs=1.0 / min(sx, sy) + 0.01)


def bars(page, selector: str) -> list[tuple[str, float]]:
    """(label, score) of each bar, as the page shows them."""
    labels = page.locator(f"{selector} li .label").all_inner_texts()
    values = page.locator(f"{selector} li .value").all_inner_texts()
    return [(label, float(value)) for label, value in zip(labels, values, strict=True)]


def test_upload_ask_ground_match_and_search(server, client, open_page, tmp_path):
    page = open_page(server.url)
    assert page.locator("#models label").all_inner_texts() == [
        "ViLBERT\ntiny-vilbert@1",
        "LXMERT\ntiny-lxmert@1",
    ]
    image = scene_png()
    upload = tmp_path / "scene.png"
    upload.write_bytes(image)
    page.set_input_files("#file", str(upload))
    page.wait_for_selector("#image-caption:has-text('scene.png · 160×96')")
    page.wait_for_selector("#answers li")

    question = "what color is the circle?"
    page.fill("#question", question)
    act(page, "#ask")
    api = client.post(
        "/v1/vqa",
        json={"image": b64(image), "questions": [question], "model": "tiny-vilbert@1", "top_k": 5},
    ).json()
    shown = bars(page, "#answers")
    assert [a for a, _ in shown] == [a["answer"] for a in api["answers"][0]["answers"]]
    assert [s for _, s in shown] == pytest.approx(
        [a["score"] for a in api["answers"][0]["answers"]], abs=2e-3
    )
    assert all(a in TINY_ANSWERS for a, _ in shown)
    assert "tiny-vilbert@1" in page.inner_text("#ask-meta")

    regions = api["regions"]
    assert page.locator(".box.region").count() == len(regions) >= 1
    for i, region in enumerate(regions):
        assert_box_drawn_at(page, ".box.region", i, region["box"], (160, 96))

    page.click("#models label:has-text('LXMERT')")
    page.wait_for_selector("#ask-meta:has-text('tiny-lxmert@1')")

    expression = "the red circle"
    page.fill("#expression", expression)
    act(page, "#ground")
    grounded = client.post(
        "/v1/ground",
        json={"image": b64(image), "expressions": [expression], "model": "lxmert"},
    ).json()["results"][0]
    assert page.locator(".box.grounded").count() == 1
    assert_box_drawn_at(page, ".box.grounded", 0, grounded["box"], (160, 96))
    assert f"region {grounded['region_index']}" in page.inner_text("#ground-result")

    texts = ["a red circle and a blue rectangle", "three green triangles"]
    page.fill("#texts", "\n".join(texts) + "\n\n")
    act(page, "#match")
    scores = client.post(
        "/v1/match", json={"image": b64(image), "texts": texts, "model": "lxmert"}
    ).json()["scores"]
    assert bars(page, "#scores") == [
        (s["text"], pytest.approx(s["score"], abs=2e-3)) for s in scores
    ]

    page.fill("#caption", "a large yellow circle")
    act(page, "#search")
    assert client.get("/v1/galleries/demo").json()["count"] == 6
    hits = page.locator(".hit")
    assert hits.count() == 6
    sample_files = {
        s["file"] for s in json.loads((SAMPLES_DIR / "index.json").read_text())["samples"]
    }
    srcs = [hits.nth(i).locator("img").get_attribute("src") for i in range(6)]
    assert {s.rsplit("/", 1)[1] for s in srcs} == sample_files
    assert page.locator("#search-error").is_hidden()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)

    hits.nth(0).locator("button").click()  # a hit becomes the image
    page.wait_for_selector(f"#image-caption:has-text('{hits.nth(0).get_attribute('data-id')}')")


def test_api_errors_appear_as_readable_messages(server, client, open_page, tmp_path):
    page = open_page(server.url)
    page.wait_for_selector("#answers li")  # the first sample, asked about on load

    page.fill("#question", "   ")
    act(page, "#ask")
    expected = client.post(
        "/v1/vqa", json={"image": b64(scene_png()), "questions": ["   "]}
    ).json()["error"]
    assert expected["code"] == "invalid_request"
    error = page.locator("#ask-error")
    assert expected["message"] in error.inner_text()
    assert "HTTP 422" in error.inner_text()
    assert page.locator("#answers li").count() == 0

    page.fill("#texts", "")
    act(page, "#match")
    assert "texts" in page.inner_text("#match-error")

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really an image")
    page.fill("#question", "what color is the circle?")
    page.set_input_files("#file", str(broken))
    page.wait_for_selector("#ask-error:has-text('HTTP 400')")
    expected = client.post(
        "/v1/vqa", json={"image": b64(broken.read_bytes()), "questions": ["what?"]}
    ).json()["error"]
    assert expected["code"] == "bad_image"
    assert expected["message"] in page.inner_text("#ask-error")
    page.wait_for_selector("#placeholder", state="visible")  # the browser cannot show it either
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-errors.png"), full_page=True)


def test_gallery_writes_ask_for_the_api_key(tiny_store, tmp_path, open_page):
    settings = make_settings(tiny_store[0], tmp_path / "data", api_key=API_KEY)
    with LiveServer(create_app(settings)) as live:
        page = open_page(live.url)
        page.fill("#caption", "two triangles")
        act(page, "#search")
        error = page.inner_text("#search-error")
        assert "HTTP 401" in error and "API key" in error
        assert page.locator(".hit").count() == 0

        page.fill("#api-key", API_KEY)
        page.click("#key-row button")
        page.wait_for_selector(".hit")
        assert page.locator(".hit").count() == 6
        assert page.locator("#search-error").is_hidden()
