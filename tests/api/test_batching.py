"""Dynamic batching and the region cache, seen through HTTP: concurrent requests share
model calls and get the answers they would get alone; a cached image skips detection."""

from __future__ import annotations

import numpy as np
import pytest

from service.app import create_app
from tests.api.helpers import b64, in_background, metric, vqa_body, wait_for, worker_blocked
from tests.support import TINY_ANSWERS, LiveServer, make_settings, png_bytes

pytestmark = pytest.mark.timeout(60)
N = 16


@pytest.fixture(scope="module")
def served(tiny_store, tmp_path_factory):
    import httpx

    settings = make_settings(
        tiny_store[0], tmp_path_factory.mktemp("data"), max_batch_size=32, max_wait_ms=20
    )
    app = create_app(settings)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, app.state.engine


def _scores(reply: dict) -> list[dict[str, float]]:
    """Per question: answer -> score (top_k covers every answer, so order is irrelevant)."""
    return [{a["answer"]: a["score"] for a in q["answers"]} for q in reply["answers"]]


def _assert_same(batched: dict, alone: dict) -> None:
    assert batched["model"] == alone["model"]
    for a, b in zip(batched["regions"], alone["regions"], strict=True):
        assert a["label"] == b["label"] and a["attributes"] == b["attributes"]
        np.testing.assert_allclose(a["box"], b["box"], atol=0.011)  # boxes round to 0.01
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    for x, y in zip(_scores(batched), _scores(alone), strict=True):
        assert x.keys() == y.keys() == set(TINY_ANSWERS)
        np.testing.assert_allclose([x[k] for k in x], [y[k] for k in x], atol=1e-4)


def test_concurrent_requests_share_model_calls_and_match_their_unbatched_answers(served):
    client, engine = served
    backbone = engine.backbone(None)
    detect = engine._detect[backbone.manifest.detector]
    encode = engine._encode[backbone.manifest.ref]
    bodies = [
        vqa_body(png_bytes(100 + i), f"what colour is shape {i}?", *(["is it big?"] * (i % 2)))
        for i in range(N)
    ]
    for body in bodies:
        body["top_k"] = len(TINY_ANSWERS)
    questions = sum(len(b["questions"]) for b in bodies)
    detect_before, encode_before = detect.batches, encode.batches
    sizes_before = metric(client, "vqa_batch_size_sum", batcher=backbone.manifest.ref)
    decoded_before = metric(client, "vqa_stage_seconds_count", stage="decode")

    with worker_blocked(engine):  # all N arrive while the device is busy
        calls = [in_background(client.post, "/v1/vqa", json=body) for body in bodies]
        decoded = lambda: metric(client, "vqa_stage_seconds_count", stage="decode")  # noqa: E731
        wait_for(lambda: decoded() - decoded_before == N)
    batched = []
    for thread, out in calls:
        thread.join(30)
        assert out[0].status_code == 200, out[0].text
        batched.append(out[0].json())

    detect_calls, encode_calls = detect.batches - detect_before, encode.batches - encode_before
    assert detect_calls <= 2 and encode_calls <= 4, (detect_calls, encode_calls)
    sizes = metric(client, "vqa_batch_size_sum", batcher=backbone.manifest.ref) - sizes_before
    assert sizes == questions  # every question went through the encoder, in few calls

    engine.cache.clear()
    for body, together in zip(bodies, batched, strict=True):
        r = client.post("/v1/vqa", json=body)  # alone: a batch of its own, detection included
        assert r.status_code == 200, r.text
        _assert_same(together, r.json())
    assert detect.batches - detect_before == detect_calls + N


def test_a_cached_image_skips_the_detector(served):
    client, engine = served
    detect = engine._detect[engine.backbone(None).manifest.detector]
    image = b64(png_bytes(7, size=(56, 40)))
    hits = lambda: metric(client, "vqa_feature_cache_total", result="hit")  # noqa: E731
    hits_before, detected_before = hits(), detect.batches
    first = client.post("/v1/vqa", json={"image": image, "questions": ["is it red?"]})
    assert first.status_code == 200, first.text
    assert detect.batches == detected_before + 1 and hits() == hits_before
    second = client.post("/v1/vqa", json={"image": image, "questions": ["how many shapes?"]})
    assert second.status_code == 200, second.text
    assert detect.batches == detected_before + 1  # no detector call
    assert hits() == hits_before + 1
    assert second.json()["regions"] == first.json()["regions"]
    grounded = client.post("/v1/ground", json={"image": image, "expressions": ["the red one"]})
    assert grounded.status_code == 200 and detect.batches == detected_before + 1
