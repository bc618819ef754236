"""Replicas on one model store and one data dir (as behind Ray Serve): a reload reaches one,
and the others catch up when asked for a gallery it moved, instead of answering 404."""

from __future__ import annotations

import threading

import pytest

from service.store import ModelStore
from tests.api import test_galleries_reload
from tests.api.helpers import in_background, live, vqa_body, wait_for
from tests.api.test_galleries_reload import (
    QUERY,
    assert_same_results,
    images,
    searches,
    write_version,
)
from tests.support import png_bytes

pytestmark = pytest.mark.timeout(120)
store = test_galleries_reload.store  # the fixture: a private copy of the tiny store
SEARCH = "/v1/galleries/pics/search"


def served(client) -> dict[str, str]:
    return {m["name"]: m["version"] for m in client.get("/v1/models").json()}


def held_catch_up(engine):
    """Hold the engine's model loads until `release` is set; `loads` lists them and
    `arrived` the requests that reached the catch-up."""
    load, catch_up = engine._load, engine._catch_up
    loads, arrived, release = [], [], threading.Event()

    def held_load(manifest):
        loads.append(manifest.ref)
        assert release.wait(30)
        return load(manifest)

    async def counted(ref):
        arrived.append(ref)
        return await catch_up(ref)

    engine._load, engine._catch_up = held_load, counted
    return loads, arrived, release


def test_a_replica_catches_up_once_with_a_reload_on_another(store, tmp_path):
    data = tmp_path / "data"
    with live(store, data) as (a, _), live(store, data) as (b, engine_b):
        assert a.put("/v1/galleries/pics", json={"model": "tiny-vilbert"}).status_code == 201
        assert a.post("/v1/galleries/pics/images", json=images(1, 2, 3, 4)).status_code == 200
        before = searches(b, "pics")
        write_version(store, "tiny-vilbert", seed=7)
        assert a.post("/v1/models/tiny-vilbert/reload").status_code == 200
        on_a = searches(a, "pics")

        reindexed = []
        reindex = engine_b.galleries.reindex

        async def counted_reindex(*args):
            reindexed.append(args[0])
            return await reindex(*args)

        engine_b.galleries.reindex = counted_reindex
        loads, arrived, release = held_catch_up(engine_b)
        first = in_background(b.post, SEARCH, json={**QUERY, "rerank": 0})
        second = in_background(b.post, SEARCH, json={**QUERY, "rerank": 0})
        wait_for(lambda: len(arrived) == 2 and loads)  # both wait on one reload
        release.set()
        for thread, _ in (first, second):
            thread.join(60)
        on_b = searches(b, "pics")
        models = served(b)
        vqa = b.post("/v1/vqa", json=vqa_body(png_bytes(1), "red?", model="tiny-vilbert"))
        lxmert = b.post("/v1/vqa", json=vqa_body(png_bytes(1), "red?", model="tiny-lxmert"))
        retired = "tiny-vilbert@1" not in engine_b._encode

    assert {s["model"] for s in before.values()} == {"tiny-vilbert@1"}
    for _, out in (first, second):
        assert out[0].status_code == 200, out[0].text
        assert_same_results({"first stage": out[0].json()}, {"first stage": on_a["rerank=0"]})
    assert loads == ["tiny-vilbert@2"]  # one reload for both searches
    assert reindexed == []  # the gallery was moved by A already
    assert {s["model"] for s in on_b.values()} == {"tiny-vilbert@2"}
    assert_same_results(on_b, on_a)
    assert models == {"tiny-vilbert": "2", "tiny-lxmert": "1"}
    assert vqa.json()["model"] == "tiny-vilbert@2"
    assert lxmert.json()["model"] == "tiny-lxmert@1"
    assert retired


def test_a_gallery_made_on_a_lagging_replica_moves_and_both_converge(store, tmp_path):
    data = tmp_path / "data"
    with live(store, data) as (a, _), live(store, data) as (b, _):
        write_version(store, "tiny-vilbert", seed=7)
        assert a.post("/v1/models/tiny-vilbert/reload").status_code == 200
        assert b.put("/v1/galleries/pics", json={"model": "tiny-vilbert"}).json()["model"] == (
            "tiny-vilbert@1"
        )  # B has not caught up: it makes the gallery on its version
        assert b.post("/v1/galleries/pics/images", json=images(1, 2)).status_code == 200
        added = a.post("/v1/galleries/pics/images", json=images(3))  # A moves it, then adds
        on_a = searches(a, "pics")
        on_b = searches(b, "pics")  # B catches up with the move
        a.put("/v1/galleries/fresh", json={"model": "tiny-vilbert"})
        a.post("/v1/galleries/fresh/images", json=images(1, 2, 3))
        fresh = searches(a, "fresh")
        models_b = served(b)
    assert added.status_code == 200, added.text
    assert {s["model"] for s in [*on_a.values(), *on_b.values()]} == {"tiny-vilbert@2"}
    assert_same_results(on_a, fresh)
    assert_same_results(on_b, fresh)
    assert models_b["tiny-vilbert"] == "2"


def test_a_gallery_on_a_version_or_model_out_of_reach_stays_404(store, tmp_path):
    data = tmp_path / "data"
    with live(store, data) as (a, _), live(store, data, models=["tiny-vilbert"]) as (b, _):
        a.put("/v1/galleries/pics", json={"model": "tiny-vilbert"})
        a.put("/v1/galleries/words", json={"model": "tiny-lxmert"})
        for gallery in ("pics", "words"):
            assert a.post(f"/v1/galleries/{gallery}/images", json=images(1)).status_code == 200
        write_version(store, "tiny-vilbert", seed=7)
        assert a.post("/v1/models/tiny-vilbert/reload").status_code == 200
        ModelStore(store).delete("tiny-vilbert@2")  # B cannot find the gallery's version
        gone = b.post(SEARCH, json=QUERY)
        other = b.post("/v1/galleries/words/search", json=QUERY)  # a model B does not serve
        models = served(b)
    assert gone.status_code == 404, gone.text
    message = gone.json()["error"]["message"]
    assert "tiny-vilbert@2 is not loaded here" in message and "newest is tiny-vilbert@1" in message
    assert other.status_code == 404, other.text
    assert "tiny-lxmert@1 is not loaded here" in other.json()["error"]["message"]
    assert models == {"tiny-vilbert": "1"}
