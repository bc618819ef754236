"""Galleries survive a model reload (issue 5): they move to the new version, re-indexed
from their stored region features, and never answer 404 on the way."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from service.models.backbone import build_backbone
from service.models.detector import RegionDetector
from service.store import ModelStore
from tests.api.helpers import b64, in_background, live
from tests.support import png_bytes

pytestmark = pytest.mark.timeout(120)
QUERY = {"caption": "a red rectangle", "k": 5}


@pytest.fixture
def store(tiny_store, tmp_path) -> Path:
    """A private copy of the tiny store, free to get new versions."""
    root = tmp_path / "store"
    shutil.copytree(tiny_store[0], root)
    return root


def write_version(store: Path, name: str, seed: int, detector: str | None = None) -> str:
    """Another version of `name`: the same config, tokenizer and answers, other weights."""
    s = ModelStore(store)
    m = s.resolve(name)
    torch.manual_seed(seed)
    model = build_backbone(m.kind, m.config)
    return s.write(
        m.name,
        m.kind,
        {"model.safetensors": model.state_dict()},
        config=m.config,
        extra_files={f: m.path / f for f in m.tokenizer or []},
        tokenizer=m.tokenizer,
        answers=m.answers,
        detector=detector or m.detector,
        tasks=m.tasks,
    ).ref


def images(*seeds: int) -> dict:
    return {"images": [{"id": f"im{s}", "image": b64(png_bytes(s))} for s in seeds]}


def searches(client, gallery: str) -> dict[str, dict]:
    """The first stage alone (the re-indexed embeddings) and with the rerank."""
    url = f"/v1/galleries/{gallery}/search"
    out = {}
    for rerank in (0, 50):
        r = client.post(url, json={**QUERY, "rerank": rerank})
        assert r.status_code == 200, r.text
        out[f"rerank={rerank}"] = r.json()
    return out


def assert_same_results(a: dict[str, dict], b: dict[str, dict]) -> None:
    for stage in a:
        assert [h["id"] for h in a[stage]["results"]] == [h["id"] for h in b[stage]["results"]]
        for x, y in zip(a[stage]["results"], b[stage]["results"], strict=True):
            assert x["score"] == pytest.approx(y["score"], abs=1e-5), stage


def paused_rebind(engine):
    """Hold each gallery's rebind commit until `release` is set; `reached` says one waits."""
    storage = engine.galleries.storage
    rebind, reached, release = storage.rebind, threading.Event(), threading.Event()

    def held(*args, **kwargs):
        reached.set()
        assert release.wait(30)
        return rebind(*args, **kwargs)

    storage.rebind = held
    return reached, release


def test_a_gallery_moves_to_the_reloaded_version_and_equals_a_fresh_one(store, tmp_path):
    data = tmp_path / "data"
    with live(store, data, default_model="tiny-vilbert") as (client, engine):
        assert client.put("/v1/galleries/pics", json={"model": "tiny-vilbert"}).status_code == 201
        assert client.post("/v1/galleries/pics/images", json=images(1, 2, 3, 4)).status_code == 200
        before = searches(client, "pics")
        assert write_version(store, "tiny-vilbert", seed=7) == "tiny-vilbert@2"

        reached, release = paused_rebind(engine)
        reload, reload_out = in_background(client.post, "/v1/models/tiny-vilbert/reload")
        assert reached.wait(30)  # re-embedded with @2, not yet committed
        during = searches(client, "pics")  # still on @1, which stays loaded
        vqa = client.post("/v1/vqa", json={"image": b64(png_bytes(1)), "questions": ["red?"]})
        late = client.post("/v1/galleries/pics/images", json=images(5))  # lands on @1
        release.set()
        reload.join(60)

        assert reload_out[0].status_code == 200, reload_out[0].text
        info = client.get("/v1/galleries/pics").json()
        after = searches(client, "pics")
        assert client.put("/v1/galleries/fresh", json={"model": "tiny-vilbert"}).status_code == 201
        client.post("/v1/galleries/fresh/images", json=images(1, 2, 3, 4, 5))
        fresh = searches(client, "fresh")
        assert "tiny-vilbert@1" not in engine._encode  # retired once no gallery needs it
    with live(store, data) as (client, _):  # a restart after the reload
        restarted_info = client.get("/v1/galleries/pics").json()
        restarted = searches(client, "pics")

    assert {s["model"] for s in during.values()} == {"tiny-vilbert@1"}
    assert_same_results(during, before)
    assert vqa.json()["model"] == "tiny-vilbert@2"
    assert late.status_code == 200, late.text
    assert info == {"name": "pics", "model": "tiny-vilbert@2", "count": 5}
    assert {s["model"] for s in after.values()} == {"tiny-vilbert@2"}
    assert_same_results(after, fresh)  # the late image was re-indexed too
    assert [h["score"] for h in after["rerank=0"]["results"]] != [
        h["score"] for h in before["rerank=0"]["results"]
    ]  # the new weights embed differently
    assert restarted_info == info
    assert_same_results(restarted, after)


def test_a_restart_on_a_newer_version_reindexes_galleries_before_ready(store, tmp_path):
    data = tmp_path / "data"
    with live(store, data) as (client, _):
        client.put("/v1/galleries/pics", json={"model": "tiny-lxmert"})
        assert client.post("/v1/galleries/pics/images", json=images(1, 2, 3)).status_code == 200
    write_version(store, "tiny-lxmert", seed=8)
    with live(store, data) as (client, _):  # serves tiny-lxmert@2 only
        info = client.get("/v1/galleries/pics").json()
        moved = searches(client, "pics")
        client.put("/v1/galleries/fresh", json={"model": "tiny-lxmert"})
        client.post("/v1/galleries/fresh/images", json=images(1, 2, 3))
        fresh = searches(client, "fresh")
    assert info == {"name": "pics", "model": "tiny-lxmert@2", "count": 3}
    assert {s["model"] for s in moved.values()} == {"tiny-lxmert@2"}
    assert_same_results(moved, fresh)


def test_a_failed_reindex_keeps_the_old_version_serving_the_gallery(store, tmp_path):
    with live(store, tmp_path / "data", api_key="k3y") as (client, engine):
        key = {"authorization": "Bearer k3y"}
        client.put("/v1/galleries/pics", json={"model": "tiny-vilbert"}, headers=key)
        client.post("/v1/galleries/pics/images", json=images(1, 2), headers=key)
        before = searches(client, "pics")
        write_version(store, "tiny-vilbert", seed=9)
        reindex = engine.galleries.reindex

        async def fails(*args):
            raise RuntimeError("disk full")

        engine.galleries.reindex = fails
        failed = client.post("/v1/models/tiny-vilbert/reload", headers=key)
        kept = searches(client, "pics")
        engine.galleries.reindex = reindex
        retried = client.post("/v1/models/tiny-vilbert/reload", headers=key)
        moved = searches(client, "pics")
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["code"] == "reload_failed" and "pics" in error["message"]
    assert "disk full" in error["message"]
    assert_same_results(kept, before)
    assert {s["model"] for s in kept.values()} == {"tiny-vilbert@1"}
    assert retried.status_code == 200 and retried.json()["version"] == "2"
    assert {s["model"] for s in moved.values()} == {"tiny-vilbert@2"}


def test_a_version_on_another_detector_is_refused_while_galleries_hold_regions(store, tmp_path):
    s = ModelStore(store)
    old_detector = s.resolve("tiny-detector")
    torch.manual_seed(3)
    detector = s.write(
        "tiny-detector",
        "detector",
        {"model.safetensors": RegionDetector.from_config(old_detector.config).state_dict()},
        config=old_detector.config,
    )
    write_version(store, "tiny-vilbert", seed=4, detector=detector.ref)
    with live(store, tmp_path / "data", models=["tiny-vilbert@1"]) as (client, _):
        client.put("/v1/galleries/pics", json={"model": "tiny-vilbert"})
        client.post("/v1/galleries/pics/images", json=images(1))
        refused = client.post("/v1/models/tiny-vilbert/reload")
        search = client.post("/v1/galleries/pics/search", json=QUERY)
        assert client.delete("/v1/galleries/pics").status_code == 204
        reloaded = client.post("/v1/models/tiny-vilbert/reload")
    assert refused.status_code == 409, refused.text
    assert "pics" in refused.json()["error"]["message"]
    assert detector.ref in refused.json()["error"]["message"]
    assert search.status_code == 200 and search.json()["model"] == "tiny-vilbert@1"
    assert reloaded.status_code == 200 and reloaded.json()["version"] == "2"
