"""Gallery operations: add images once (regions + embedding), search by caption in two stages.

Stage one: faiss over the single-modality embeddings (text vs image, no cross
attention), cheap for any gallery size. Stage two: the top `rerank` hits rescored by
`two_stage_scores`: the embeddings' logit (cosine / T) plus the log-probability the
backbone's cross-attention alignment head gives the pair, on the stored region features.
A hit's `score` is that sum (or cosine / T alone past the reranked ones): higher is better.

Image embeddings are computed from the region features as stored (float16), so
`reindex` recomputes them for another model version from the database alone and gets
what adding the images to a fresh gallery on that version gives.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from service.data.collate import RegionSet
from service.errors import Conflict
from service.gallery.storage import GalleryStorage, Rebound, StoredImage
from service.models.backbone import EMBED_TEMPERATURE, two_stage_scores

if TYPE_CHECKING:  # the engine drives the models; galleries only call it
    from service.runtime.engine import Engine
    from service.runtime.worker import LoadedBackbone

ATTEMPTS = 3  # tries of a request that races a re-index (each retry uses the new version)


class Galleries:
    def __init__(self, engine: Engine, data_dir: Path | str):
        self.engine = engine
        self.storage = GalleryStorage(data_dir)

    def close(self) -> None:
        self.storage.close()

    async def create(self, name: str, model: str | None) -> dict:
        ref = self.engine.backbone(model).manifest.ref
        await asyncio.to_thread(self.storage.create, name, ref)
        return {"name": name, "model": ref, "count": 0}

    async def info(self, name: str) -> dict:
        model = await asyncio.to_thread(self.storage.model_of, name)
        count = await asyncio.to_thread(self.storage.count, name)
        return {"name": name, "model": model, "count": count}

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self.storage.delete, name)

    async def delete_image(self, name: str, image_id: str) -> None:
        await asyncio.to_thread(self.storage.delete_image, name, image_id)

    async def add(self, name: str, images: list[tuple[str | None, bytes]]) -> list[str]:
        """Detect and embed every image first; then store them all in one transaction."""
        decoded = await asyncio.gather(*(self.engine.decode(data) for _, data in images))
        ids = [
            given or image.sha256[:16] for (given, _), image in zip(images, decoded, strict=True)
        ]
        if len(set(ids)) != len(ids):
            raise Conflict("two images in this request have the same id (or the same bytes)")
        for attempt in range(ATTEMPTS):
            model = await asyncio.to_thread(self.storage.model_of, name)
            try:
                async with self.engine.gallery_model(model) as backbone:
                    regions = await asyncio.gather(
                        *(self.engine.regions(backbone, im) for im in decoded)
                    )
                    sets = [as_stored(r.region_set) for r in regions]
                    embeddings = await self._embed(backbone, sets)
                stored = [
                    StoredImage(i, im.sha256, emb, rs.features.numpy(), rs.boxes.numpy())
                    for i, im, emb, rs in zip(ids, decoded, embeddings, sets, strict=True)
                ]
                await asyncio.to_thread(self.storage.add, name, stored, model)
                return ids
            except Rebound:
                if attempt == ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def search(self, name: str, caption: str, k: int, rerank: int) -> dict:
        for attempt in range(ATTEMPTS):
            model = await asyncio.to_thread(self.storage.model_of, name)
            try:
                async with self.engine.gallery_model(model) as backbone:
                    hits = await self._search(backbone, name, caption, k, rerank)
                return {"model": model, "results": hits}
            except Rebound:
                if attempt == ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _search(
        self, backbone: LoadedBackbone, name: str, caption: str, k: int, rerank: int
    ) -> list[dict]:
        from service.runtime.worker import EncodeItem

        ref = backbone.manifest.ref
        [query] = await self.engine.encode(backbone, [EncodeItem("embed_text", caption, None)])
        hits = await asyncio.to_thread(self.storage.nearest, name, query, max(k, rerank), ref)
        head, tail = hits[:rerank], hits[rerank:]
        ranked = []
        if head:
            ids = [i for i, _ in head]
            regions = await asyncio.to_thread(self.storage.regions, name, ids)
            items = [
                EncodeItem("align", caption, RegionSet(torch.from_numpy(f), torch.from_numpy(b)))
                for f, b in regions
            ]
            logits = await self.engine.encode(backbone, items)
            cosine = torch.tensor([c for _, c in head])
            scores = two_stage_scores(cosine, torch.tensor(logits)).tolist()
            ranked = sorted(zip(ids, scores, strict=True), key=lambda h: -h[1])
        hits = ranked + [(i, c / EMBED_TEMPERATURE) for i, c in tail]  # past the rerank
        return [{"id": i, "score": round(float(s), 6)} for i, s in hits[:k]]

    # -- moving to another model version ---------------------------------------------
    async def reindex(self, name: str, old: str, backbone: LoadedBackbone) -> int:
        """Re-embed gallery `name` (bound to `old`) with `backbone` from its stored region
        features, then rebind it to backbone's version in one transaction.

        Until that commit the gallery serves on `old` (the caller keeps it loaded). Images
        added meanwhile are embedded in a further round. Returns the number of images.
        """
        embeddings: dict[str, np.ndarray] = {}
        pages = self.storage.region_pages(name)  # read on a thread, page by page
        while page := await asyncio.to_thread(next, pages, None):
            embeddings.update(await self._embed_stored(backbone, dict(zip(*page, strict=True))))
        new = backbone.manifest.ref
        while missing := await asyncio.to_thread(self.storage.rebind, name, old, new, embeddings):
            stored = await asyncio.to_thread(self.storage.region_map, name, missing)
            embeddings.update(await self._embed_stored(backbone, stored))
        return len(embeddings)

    async def _embed_stored(
        self, backbone: LoadedBackbone, regions: dict[str, tuple[np.ndarray, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """id -> embedding (D,) of stored (features, boxes)."""
        if not regions:
            return {}
        sets = [RegionSet(torch.from_numpy(f), torch.from_numpy(b)) for f, b in regions.values()]
        return dict(zip(regions, await self._embed(backbone, sets), strict=True))

    async def _embed(self, backbone: LoadedBackbone, sets: list[RegionSet]) -> np.ndarray:
        """(N, D) image embeddings, on the worker thread, between batches."""
        loop = asyncio.get_running_loop()
        worker = self.engine.worker
        return await loop.run_in_executor(worker.executor, worker.embed_images, backbone, sets)


def as_stored(regions: RegionSet) -> RegionSet:
    """The regions as the database keeps them: features rounded to float16."""
    return RegionSet(regions.features.half().float(), regions.boxes)
