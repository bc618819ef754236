"""Gallery operations: add images once (regions + embedding), search by caption in two stages.

Stage one: faiss over the single-modality embeddings (text vs image, no cross
attention), cheap for any gallery size. Stage two: the top `rerank` hits rescored by
the backbone's cross-attention alignment head on the stored region features.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from service.data.collate import RegionSet
from service.errors import Conflict
from service.gallery.storage import GalleryStorage, StoredImage

if TYPE_CHECKING:  # the engine drives the models; galleries only call it
    from service.runtime.engine import Engine


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
        backbone = self.engine.backbone(await asyncio.to_thread(self.storage.model_of, name))
        decoded = await asyncio.gather(*(self.engine.decode(data) for _, data in images))
        ids = [
            given or image.sha256[:16] for (given, _), image in zip(images, decoded, strict=True)
        ]
        if len(set(ids)) != len(ids):
            raise Conflict("two images in this request have the same id (or the same bytes)")
        regions = await asyncio.gather(*(self.engine.regions(backbone, im) for im in decoded))
        sets = [r.region_set for r in regions]
        loop = asyncio.get_running_loop()
        embeddings = await loop.run_in_executor(
            self.engine.worker.executor, self.engine.worker.embed_images, backbone, sets
        )
        stored = [
            StoredImage(i, im.sha256, emb, rs.features.numpy(), rs.boxes.numpy())
            for i, im, emb, rs in zip(ids, decoded, embeddings, sets, strict=True)
        ]
        await asyncio.to_thread(self.storage.add, name, stored)
        return ids

    async def search(self, name: str, caption: str, k: int, rerank: int) -> dict:
        from service.runtime.worker import EncodeItem

        model = await asyncio.to_thread(self.storage.model_of, name)
        backbone = self.engine.backbone(model)
        [query] = await self.engine.encode(backbone, [EncodeItem("embed_text", caption, None)])
        hits = await asyncio.to_thread(self.storage.nearest, name, query, max(k, rerank))
        if rerank and hits:
            head = [i for i, _ in hits[:rerank]]
            regions = await asyncio.to_thread(self.storage.regions, name, head)
            items = [
                EncodeItem("match", caption, RegionSet(torch.from_numpy(f), torch.from_numpy(b)))
                for f, b in regions
            ]
            logits = await self.engine.encode(backbone, items)
            scores = torch.sigmoid(torch.tensor(logits)).tolist()
            reranked = sorted(zip(head, scores, strict=True), key=lambda h: -h[1])
            hits = reranked + hits[rerank:]
        return {
            "model": model,
            "results": [{"id": i, "score": round(float(s), 6)} for i, s in hits[:k]],
        }
