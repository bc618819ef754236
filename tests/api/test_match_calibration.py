"""/v1/match serves the calibration in the model's manifest (`vqa train calibrate`)."""

from __future__ import annotations

import math
import shutil

import pytest

from service.store import ModelStore
from tests.api.helpers import b64, live
from tests.support import png_bytes

pytestmark = pytest.mark.timeout(120)
TEXTS = ["a red rectangle", "two blue circles", "a green triangle below a square"]


def _logits(client, model: str) -> list[float]:
    r = client.post("/v1/match", json={"image": b64(png_bytes(5)), "texts": TEXTS, "model": model})
    assert r.status_code == 200, r.text
    return [math.log(s["score"] / (1 - s["score"])) for s in r.json()["scores"]]


def test_match_scores_follow_the_manifests_calibration(tiny_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tiny_store[0], root)
    with live(root, tmp_path / "data") as (client, _):
        head = _logits(client, "tiny-lxmert")
        models = {m["name"]: m for m in client.get("/v1/models").json()}
        assert models["tiny-lxmert"]["match_calibration"] is None

    store = ModelStore(root)
    calibration = {"head": 2.0, "cosine": 0.0, "bias": -1.0, "fitted_on": {"split": "val"}}
    store.update_manifest(store.resolve("tiny-lxmert"), match_calibration=calibration)
    with live(root, tmp_path / "data") as (client, _):
        calibrated = _logits(client, "tiny-lxmert")
        models = {m["name"]: m for m in client.get("/v1/models").json()}
        assert models["tiny-lxmert"]["match_calibration"] == calibration
        assert models["tiny-vilbert"]["match_calibration"] is None
    assert calibrated == pytest.approx([2.0 * h - 1.0 for h in head], abs=1e-3)


def test_a_by_sentence_calibration_scores_a_text_by_its_least_sentence(tiny_store, tmp_path):
    """With `by_sentence`, a text of two sentences gets the least of its own logit and
    each sentence's, as /v1/match scores those texts alone; a one-sentence text is as
    before."""
    root = tmp_path / "store"
    shutil.copytree(tiny_store[0], root)
    store = ModelStore(root)
    calibration = {"head": 2.0, "cosine": 0.5, "bias": -1.0, "by_sentence": True}
    store.update_manifest(store.resolve("tiny-lxmert"), match_calibration=calibration)
    first, second = "a red rectangle", "the red rectangle is left of a blue circle"
    texts = [f"{first}. {second}", first, second]
    with live(root, tmp_path / "data") as (client, _):
        r = client.post(
            "/v1/match", json={"image": b64(png_bytes(5)), "texts": texts, "model": "tiny-lxmert"}
        )
        assert r.status_code == 200, r.text
        by_sentence = [math.log(s["score"] / (1 - s["score"])) for s in r.json()["scores"]]
        store.update_manifest(
            store.resolve("tiny-lxmert"), match_calibration={**calibration, "by_sentence": False}
        )
    with live(root, tmp_path / "data") as (client, _):
        r = client.post(
            "/v1/match", json={"image": b64(png_bytes(5)), "texts": texts, "model": "tiny-lxmert"}
        )
        whole = [math.log(s["score"] / (1 - s["score"])) for s in r.json()["scores"]]
    assert by_sentence[1:] == pytest.approx(whole[1:], abs=1e-3)
    assert by_sentence[0] == pytest.approx(min(whole), abs=1e-3)
    assert whole[0] > whole[1] + 1  # so the least is a sentence's, not the text's own


def test_caption_search_reranks_with_the_alignment_head_whatever_the_calibration(
    tiny_store, tmp_path
):
    """The gallery's second stage reads the alignment head's logit, as `vqa eval` measures
    it (docs/experiments/rerank.md), not /v1/match's calibrated one: a calibration in the
    manifest leaves search scores as they were, and /v1/match's scores not."""
    root = tmp_path / "store"
    shutil.copytree(tiny_store[0], root)
    images = [{"id": f"im{i}", "image": b64(png_bytes(10 + i))} for i in range(4)]
    caption = "a red rectangle. the red rectangle is left of a blue circle"
    search = {"caption": caption, "k": 4, "rerank": 4}

    def scores(client) -> tuple[dict, list[float]]:
        assert client.put("/v1/galleries/g", json={"model": "tiny-lxmert"}).status_code == 201
        assert client.post("/v1/galleries/g/images", json={"images": images}).status_code == 200
        r = client.post("/v1/galleries/g/search", json=search)
        assert r.status_code == 200, r.text
        assert client.delete("/v1/galleries/g").status_code == 204
        return {h["id"]: h["score"] for h in r.json()["results"]}, _logits(client, "tiny-lxmert")

    with live(root, tmp_path / "data") as (client, _):
        head_search, head_match = scores(client)
    store = ModelStore(root)
    calibration = {"head": 2.0, "cosine": 0.5, "bias": -1.0, "by_sentence": True}
    store.update_manifest(store.resolve("tiny-lxmert"), match_calibration=calibration)
    with live(root, tmp_path / "data") as (client, _):
        calibrated_search, calibrated_match = scores(client)
    assert calibrated_search == pytest.approx(head_search, abs=1e-4)
    assert calibrated_match != pytest.approx(head_match, abs=1e-2)


def test_a_claims_calibration_caps_a_captions_score_by_its_claims(tiny_store, tmp_path):
    """With `claims`, a caption the grammar reads scores no higher than its least claim
    margin (at least UNANSWERABLE) less the threshold: a threshold of +300 puts every such
    caption far below a match and leaves a text without claims as it was; -300 changes
    nothing."""
    root = tmp_path / "store"
    shutil.copytree(tiny_store[0], root)
    store = ModelStore(root)
    # the grammar has no squares: the last text has no claims to ask
    texts = [*TEXTS[:2], "a green triangle below a rectangle", "a green triangle below a square"]
    calibration = {"head": 1.0, "cosine": 0.0, "bias": 0.0}

    def logits(claims: float | None) -> list[float]:
        store.update_manifest(
            store.resolve("tiny-lxmert"), match_calibration={**calibration, "claims": claims}
        )
        with live(root, tmp_path / "data") as (client, _):
            r = client.post(
                "/v1/match",
                json={"image": b64(png_bytes(5)), "texts": texts, "model": "tiny-lxmert"},
            )
            assert r.status_code == 200, r.text
            return [s["score"] for s in r.json()["scores"]]

    unasked, lenient, strict = logits(None), logits(-300.0), logits(300.0)
    assert lenient == pytest.approx(unasked, abs=1e-6)
    assert all(score < 1e-6 for score in strict[:3])  # sigmoid(at most -200)
    assert strict[3] == pytest.approx(unasked[3], abs=1e-6)
    assert min(unasked[:3]) > 1e-3  # so the cap is what moved them
