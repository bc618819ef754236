"""Every endpoint over real HTTP against tiny random models in a temp store."""

from __future__ import annotations

import base64

import httpx
import pytest

from service.app import create_app
from tests.support import TINY_ANSWERS, LiveServer, make_settings, png_bytes


@pytest.fixture(scope="module")
def server(tiny_store, tmp_path_factory):
    store, _ = tiny_store
    data_dir = tmp_path_factory.mktemp("data")
    app = create_app(make_settings(store, data_dir, default_model="tiny-vilbert"))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_health_ready_and_models(client, tiny_store):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    models = client.get("/v1/models").json()
    assert {m["backbone"] for m in models} == {"vilbert", "lxmert"}
    for m in models:
        assert m["detector"] == tiny_store[1]["detector"]
        assert "vqa" in m["tasks"]


@pytest.mark.parametrize("model", [None, "vilbert", "lxmert", "tiny-lxmert@1"])
def test_vqa_json_answers_every_question(client, model):
    body = {
        "image": b64(png_bytes(1)),
        "questions": ["what color is it?", "is it round?"],
        "top_k": 4,
    }
    if model:
        body["model"] = model
    r = client.post("/v1/vqa", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    expected_kind = "lxmert" if model and "lxmert" in model else "vilbert"
    assert out["model"].startswith(f"tiny-{expected_kind}@")
    assert [a["question"] for a in out["answers"]] == body["questions"]
    for a in out["answers"]:
        scores = [x["score"] for x in a["answers"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert all(x["answer"] in TINY_ANSWERS for x in a["answers"])
    assert 4 <= len(out["regions"]) <= 8
    for region in out["regions"]:
        x1, y1, x2, y2 = region["box"]
        assert 0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 48
        assert set(region["attributes"]) == {"color", "size"}


def test_vqa_multipart_equals_json(client):
    image = png_bytes(2)
    questions = ["is there a circle?", "how many shapes?"]
    j = client.post("/v1/vqa", json={"image": b64(image), "questions": questions}).json()
    m = client.post(
        "/v1/vqa",
        files={"image": ("x.png", image, "image/png")},
        data={"question": questions},
    )
    assert m.status_code == 200, m.text
    assert m.json() == j


def test_match_scores_are_probabilities(client):
    texts = ["a red rectangle", "two blue circles"]
    r = client.post("/v1/match", json={"image": b64(png_bytes(3)), "texts": texts})
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    assert [s["text"] for s in scores] == texts
    assert all(0.0 <= s["score"] <= 1.0 for s in scores)
    m = client.post("/v1/match", files={"image": ("x.png", png_bytes(3))}, data={"text": texts})
    assert m.json() == r.json()


def test_ground_returns_a_detected_box(client):
    image = b64(png_bytes(4))
    regions = client.post("/v1/vqa", json={"image": image, "questions": ["q"]}).json()["regions"]
    r = client.post(
        "/v1/ground", json={"image": image, "expressions": ["the red rectangle"], "model": "lxmert"}
    )
    assert r.status_code == 200, r.text
    [res] = r.json()["results"]
    assert res["box"] == regions[res["region_index"]]["box"] or r.json()["model"] != "vilbert"
    assert 0 < res["score"] <= 1


def test_gallery_lifecycle_and_search(client):
    assert client.put("/v1/galleries/pics", json={"model": "lxmert"}).status_code == 201
    assert client.put("/v1/galleries/pics", json={}).status_code == 409
    images = [{"id": f"im{i}", "image": b64(png_bytes(10 + i))} for i in range(5)]
    r = client.post("/v1/galleries/pics/images", json={"images": images})
    assert r.status_code == 200, r.text
    assert r.json()["ids"] == [f"im{i}" for i in range(5)]
    info = client.get("/v1/galleries/pics").json()
    assert info["count"] == 5 and info["model"].startswith("tiny-lxmert@")
    s = client.post("/v1/galleries/pics/search", json={"caption": "a red rectangle", "k": 3})
    assert s.status_code == 200, s.text
    hits = s.json()["results"]
    assert len(hits) == 3 and {h["id"] for h in hits} <= {f"im{i}" for i in range(5)}
    assert client.delete("/v1/galleries/pics/images/im0").status_code == 204
    assert client.get("/v1/galleries/pics").json()["count"] == 4
    assert client.delete("/v1/galleries/pics/images/im0").status_code == 404
    assert client.delete("/v1/galleries/pics").status_code == 204
    assert client.get("/v1/galleries/pics").status_code == 404


def test_metrics_report_requests_and_stages(client):
    client.post("/v1/vqa", json={"image": b64(png_bytes(5)), "questions": ["q"]})
    text = client.get("/metrics").text
    assert 'vqa_requests_total{route="/v1/vqa",status="200"}' in text
    for stage in ("decode", "detect", "encode"):
        assert f'vqa_stage_seconds_count{{stage="{stage}"}}' in text
    assert "vqa_batch_size_bucket" in text


def test_openapi_describes_both_bodies(client):
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/v1/vqa"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert "top_k" in content["application/json"]["schema"]["properties"]
    assert client.get("/docs").status_code == 200
