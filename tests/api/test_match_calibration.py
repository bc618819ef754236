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
