"""Faults over real HTTP: a full queue, a timeout, a client that hangs up, a model that
raises, a corrupted checkpoint, and images that attack the decoder."""

from __future__ import annotations

import asyncio
import io
import shutil
import statistics
import time

import httpx
import pytest
from PIL import Image

from service.app import create_app
from service.data.tokenizer import load_tokenizer
from service.runtime.engine import Engine
from service.store import ChecksumMismatch
from tests.api.helpers import in_background, live, metric, vqa_body, wait_for, worker_blocked
from tests.support import LiveServer, make_settings, png_bytes

pytestmark = pytest.mark.timeout(60)


def test_full_queue_answers_503_with_retry_after_at_once(tiny_store, tmp_path):
    with live(tiny_store[0], tmp_path / "data", max_queue=2, max_batch_size=1) as (client, engine):
        image = png_bytes(1)
        assert client.post("/v1/vqa", json=vqa_body(image)).status_code == 200  # cached now
        batcher = engine._encode[engine.backbone(None).manifest.ref]
        with worker_blocked(engine):
            # One request runs (blocked on the device), two wait in the queue: it is full.
            waiting = [in_background(client.post, "/v1/vqa", json=vqa_body(image))]
            wait_for(lambda: engine.cache.hits == 1 and batcher.queue_depth == 0)
            for _ in range(2):
                waiting.append(in_background(client.post, "/v1/vqa", json=vqa_body(image)))
            wait_for(lambda: batcher.queue_depth == 2)
            latencies = []
            for _ in range(5):
                start = time.perf_counter()
                r = client.post("/v1/vqa", json=vqa_body(image))
                latencies.append(time.perf_counter() - start)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "queue_full"
                assert int(r.headers["retry-after"]) >= 1
        for thread, out in waiting:
            thread.join(30)
            assert out[0].status_code == 200, out[0].text
    assert statistics.median(latencies) < 0.05, latencies


def test_request_outliving_its_timeout_gets_504(tiny_store, tmp_path):
    with live(tiny_store[0], tmp_path / "data", timeout_s=0.3) as (client, engine):
        image = png_bytes(2)
        with worker_blocked(engine):
            start = time.perf_counter()
            r = client.post("/v1/vqa", json=vqa_body(image))
            elapsed = time.perf_counter() - start
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout"
        assert 0.3 <= elapsed < 3
        assert client.post("/v1/vqa", json=vqa_body(image)).status_code == 200


def _record_model_inputs(engine: Engine, monkeypatch) -> tuple[list, list]:
    """Wrap the detector and the default backbone: lists of image sizes and questions seen."""
    backbone = engine.backbone(None)
    detector = backbone.detector.module
    sizes, questions = [], []
    extract, answer = detector.extract, backbone.module.answer
    tokenizer = load_tokenizer()

    def recording_extract(images, *a, **kw):
        sizes.extend(tuple(im.shape[-2:]) for im in images)  # (H, W)
        return extract(images, *a, **kw)

    def recording_answer(batch):
        questions.extend(tokenizer.batch_decode(batch.input_ids, skip_special_tokens=True))
        return answer(batch)

    monkeypatch.setattr(detector, "extract", recording_extract)
    monkeypatch.setattr(backbone.module, "answer", recording_answer)
    return sizes, questions


def test_request_whose_client_hung_up_never_reaches_the_model(tiny_store, tmp_path, monkeypatch):
    with live(tiny_store[0], tmp_path / "data") as (client, engine):
        cached, fresh = png_bytes(3), png_bytes(4, size=(40, 30))
        assert client.post("/v1/vqa", json=vqa_body(cached)).status_code == 200
        sizes, questions = _record_model_inputs(engine, monkeypatch)
        with worker_blocked(engine):
            # One waits for the detector, one (cached regions) for the encoder; both give up.
            for image, question in [(fresh, "first gone"), (cached, "second gone")]:
                with pytest.raises(httpx.ReadTimeout):
                    client.post("/v1/vqa", json=vqa_body(image, question), timeout=0.5)
            hung_up = dict(route="/v1/vqa", status="499")
            wait_for(lambda: metric(client, "vqa_requests_total", **hung_up) == 2)
        r = client.post("/v1/vqa", json=vqa_body(cached, "later question"))
        assert r.status_code == 200, r.text
    assert questions == ["later question"]
    assert (30, 40) not in sizes


def test_a_failing_batch_fails_only_its_requests(tiny_store, tmp_path, monkeypatch):
    poison = load_tokenizer().convert_tokens_to_ids("poison")
    with live(tiny_store[0], tmp_path / "data", max_batch_size=1) as (client, engine):
        module = engine.backbone(None).module
        answer = module.answer

        def answer_unless_poisoned(batch):
            if (batch.input_ids == poison).any():
                raise RuntimeError("poisoned batch")
            return answer(batch)

        monkeypatch.setattr(module, "answer", answer_unless_poisoned)
        image = png_bytes(5)
        client.post("/v1/vqa", json=vqa_body(image))  # regions cached: requests meet at encode
        questions = ["is it red?", "poison", "how many?", "is it big?", "where?", "what shape?"]
        calls = [in_background(client.post, "/v1/vqa", json=vqa_body(image, q)) for q in questions]
        replies = {}
        for q, (thread, out) in zip(questions, calls, strict=True):
            thread.join(30)
            replies[q] = out[0]
        failed = replies.pop("poison")
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert error["code"] == "internal"
        assert error["request_id"] == failed.headers["x-request-id"]
        assert error["request_id"] in error["message"]
        assert "poisoned" not in failed.text  # no internals leak
        assert all(r.status_code == 200 for r in replies.values())
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/vqa", json=vqa_body(image, "and now?")).status_code == 200
        assert metric(client, "vqa_requests_total", route="/v1/vqa", status="500") == 1


def test_checkpoint_with_one_changed_byte_is_refused_at_start(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store[0], store)
    weights = store / "tiny-lxmert" / "1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    engine = create_app(make_settings(store, tmp_path / "data")).state.engine
    with pytest.raises(ChecksumMismatch, match="sha256 mismatch") as caught:
        asyncio.run(engine.start())
    assert str(weights) in str(caught.value)
    assert not engine.ready


# -- images that attack the decoder, through HTTP -------------------------------------


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _scene(size=(64, 48)) -> Image.Image:
    return Image.open(io.BytesIO(png_bytes(7, size=size))).convert("RGB")


@pytest.fixture(scope="module")
def client(tiny_store, tmp_path_factory):
    settings = make_settings(
        tiny_store[0], tmp_path_factory.mktemp("data"), max_image_pixels=512 * 512
    )
    with LiveServer(create_app(settings)) as server, httpx.Client(base_url=server.url) as c:
        yield c


def _answer(client, data: bytes) -> dict:
    r = client.post("/v1/vqa", json=vqa_body(data, "what colour?", top_k=10))
    assert r.status_code == 200, r.text
    return r.json()


def test_exif_rotated_jpeg_is_answered_in_the_rotated_frame(client):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x48, shown rotated 90 degrees clockwise: 48 wide, 64 high
    jpeg = _encode(_scene(), "JPEG", exif=exif.tobytes())
    shown = Image.open(io.BytesIO(jpeg))
    shown = shown.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 means
    assert shown.size == (48, 64)
    rotated = _answer(client, jpeg)
    same_pixels = _answer(client, _encode(shown, "PNG"))
    assert rotated == same_pixels
    for region in rotated["regions"]:
        x1, y1, x2, y2 = region["box"]
        assert 0 <= x1 <= x2 <= 48 and 0 <= y1 <= y2 <= 64


def test_animated_gif_is_answered_from_its_first_frame(client):
    first = _scene().quantize(64)
    second = Image.new("RGB", (64, 48), (0, 0, 255)).quantize(64)
    gif = _encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    assert _answer(client, gif) == _answer(client, _encode(first.convert("RGB"), "PNG"))


def _bomb() -> bytes:
    png = bytearray(_encode(Image.new("RGB", (1, 1)), "PNG"))
    at = png.index(b"IHDR")
    png[at + 4 : at + 12] = (100_000).to_bytes(4, "big") * 2  # declares 100k x 100k
    return bytes(png)


@pytest.mark.parametrize(
    "data, status",
    [
        (_encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), 200),
        (_encode(Image.new("I;16", (40, 30), 40000), "PNG"), 200),
        (_encode(_scene().convert("P"), "PNG"), 200),
        (_encode(_scene().convert("CMYK"), "JPEG"), 200),
        (_encode(_scene().convert("LA"), "PNG"), 200),
        (_bomb(), 400),
        (_encode(_scene(), "JPEG")[:300], 400),
        (_encode(_scene((600, 600)), "PNG"), 400),
    ],
    ids=["1x1", "16-bit", "palette", "cmyk", "gray-alpha", "bomb", "truncated-jpeg", "too-big"],
)
def test_odd_images_get_an_answer_or_a_400(client, data, status):
    start = time.perf_counter()
    r = client.post("/v1/vqa", json=vqa_body(data))
    assert time.perf_counter() - start < 5  # no hang
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["code"] == "bad_image"
    else:
        assert r.json()["answers"][0]["answers"]
