"""The retrieval benchmark's gallery filling, exhaustive scoring and recall, on the tiny
models in this process."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from bench.retrieval import exhaustive, fill_gallery, recall
from service.data.collate import RegionSet
from service.runtime.engine import Engine
from tests.support import make_settings

pytestmark = pytest.mark.timeout(60)


def region_sets(n: int, dim: int = 32) -> list[RegionSet]:
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.4, 0.3, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]])
    return [RegionSet(torch.randn(3, dim, generator=g).relu(), boxes) for _ in range(n)]


def test_recall_counts_a_copy_of_a_right_image_as_right():
    relevant = [{0}, {1, 2}]
    # gallery of 9 tiling 3 distinct images: index 3 is a copy of image 0, 5 of image 2
    assert recall([[3, 1], [5, 0]], relevant, distinct=3)["R@1"] == 1.0
    assert recall([[1, 3], [0, 5]], relevant, distinct=3) == {"R@1": 0.0, "R@5": 1.0, "R@10": 1.0}


def test_a_tiled_gallery_is_searched_in_two_stages_and_exhaustively(tiny_store, tmp_path):
    store, refs = tiny_store
    regions = region_sets(3)

    async def run():
        engine = Engine(make_settings(store, tmp_path / "data", models=[refs["lxmert"]]))
        await engine.start()
        try:
            _, dim = fill_gallery(engine, "g", refs["lxmert"], regions, size=7)
            info = await engine.galleries.info("g")
            two = await engine.galleries.search("g", "a red circle", k=7, rerank=5)
            every = await asyncio.to_thread(
                exhaustive, engine, refs["lxmert"], regions, 7, ["a red circle"]
            )
            return dim, info, two, every
        finally:
            await engine.stop()

    dim, info, two, (latencies, ranked) = asyncio.run(run())
    assert dim == 16 and info["count"] == 7  # tiny models embed in 16 dims
    assert sorted(hit["id"] for hit in two["results"]) == [f"g{i:06d}" for i in range(7)]
    assert len(latencies) == 1 and sorted(ranked[0]) == list(range(7))
    # copies of one image score alike, so they sit next to each other in the ranking
    scores_by_image = {}
    for position, g in enumerate(ranked[0]):
        scores_by_image.setdefault(g % 3, []).append(position)
    assert all(np.ptp(p) == len(p) - 1 for p in scores_by_image.values())
