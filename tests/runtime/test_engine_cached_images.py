"""A cached image is neither decoded nor detected again: only the encoder runs."""

from __future__ import annotations

import asyncio

import pytest

from service.runtime.engine import Engine
from tests.support import make_settings, png_bytes

pytestmark = pytest.mark.timeout(60)


def stage_count(engine: Engine, stage: str) -> float:
    for metric in engine.metrics.stage_seconds.collect():
        for s in metric.samples:
            if s.name.endswith("_count") and s.labels["stage"] == stage:
                return s.value
    return 0.0


def test_a_later_question_skips_decode_and_detect_and_sees_the_same_regions(tiny_store, tmp_path):
    store, _ = tiny_store
    image = png_bytes(7)

    async def ask_twice():
        engine = Engine(make_settings(store, tmp_path / "data"))
        await engine.start()
        try:
            first = await engine.vqa(image, ["what color?"], None, 3)
            counts = [stage_count(engine, s) for s in ("decode", "detect", "encode")]
            later = await engine.vqa(image, ["how many?"], None, 3)
            after = [stage_count(engine, s) for s in ("decode", "detect", "encode")]
            other = await engine.vqa(png_bytes(8), ["what color?"], None, 3)
            hits = engine.metrics.cache.labels("hit")._value.get()
            return first, later, other, counts, after, hits
        finally:
            await engine.stop()

    first, later, other, counts, after, hits = asyncio.run(ask_twice())
    assert counts == [1, 1, 1] and after == [1, 1, 2]  # only the encoder ran again
    assert hits == 1
    assert later["regions"] == first["regions"]
    assert other["regions"] != first["regions"]  # a new image is decoded and detected
