"""The engine: models, batchers, cache and galleries behind the API's async calls.

bytes -> decode and check -> sha256 -> feature cache? -> detector batch -> regions ->
encoder batch (across requests, one model) -> heads -> answers. Each stage is timed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager

import torch

from service.config import Settings
from service.errors import NotFound, Unavailable
from service.gallery.service import Galleries
from service.runtime.batcher import DynamicBatcher
from service.runtime.cache import RegionCache
from service.runtime.images import DecodedImage, decode_image
from service.runtime.metrics import Metrics
from service.runtime.worker import (
    DetectedRegions,
    EncodeItem,
    LoadedBackbone,
    LoadedDetector,
    Worker,
    resolve,
)
from service.store import ModelStore

log = logging.getLogger("vqa.engine")
ALIASES = ("vilbert", "lxmert")


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.state = "starting: loading models"
        self.store = ModelStore(settings.store)
        self.cache: RegionCache[DetectedRegions] = RegionCache(
            max_entries=max(1, settings.feature_cache_entries)
        )
        self.worker: Worker | None = None
        self.detectors: dict[str, LoadedDetector] = {}
        self.backbones: dict[str, LoadedBackbone] = {}
        self._detect: dict[str, DynamicBatcher] = {}
        self._encode: dict[str, DynamicBatcher] = {}
        self.galleries = Galleries(self, settings.data_dir)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # -- life cycle ------------------------------------------------------------------
    async def start(self) -> None:
        self.worker = Worker(self.settings.device)
        await asyncio.to_thread(self._load_models)
        for ref in self.detectors:
            self._detect[ref] = self._batcher(ref, self._detect_handler(ref))
        for ref in self.backbones:
            self._encode[ref] = self._batcher(ref, self._encode_handler(ref))
        for b in (*self._detect.values(), *self._encode.values()):
            await b.start()
        self.state = "ready"
        log.info("ready on %s with %s", self.worker.device, ", ".join(self.backbones))

    async def stop(self, drain_timeout: float = 10.0) -> None:
        self.state = "draining"
        stops = [b.stop(drain=True) for b in (*self._detect.values(), *self._encode.values())]
        try:
            await asyncio.wait_for(asyncio.gather(*stops), timeout=drain_timeout)
        except TimeoutError:
            log.warning("drain timed out after %.1f s", drain_timeout)
        self.galleries.close()
        if self.worker:
            self.worker.close()
        self.state = "stopped"

    def _load_models(self) -> None:
        names = self.settings.models
        manifests = [m for m in self.store.latest() if m.kind != "detector"]
        if names:
            manifests = [resolve(self.store, n) for n in names]
        for m in manifests:
            det_ref = m.detector
            if det_ref is None:
                raise NotFound(f"model {m.ref} names no detector in its manifest")
            if det_ref not in self.detectors:
                det = self.worker.load_detector(self.store, resolve(self.store, det_ref))
                self.detectors[det_ref] = det
            self.backbones[m.ref] = self.worker.load_backbone(
                self.store, m, self.detectors[det_ref]
            )

    def _batcher(self, ref: str, handler) -> DynamicBatcher:
        s = self.settings

        def on_batch(size: int, seconds: float) -> None:
            self.metrics.batch_size.labels(ref).observe(size)

        return DynamicBatcher(
            handler,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
            executor=self.worker.executor,
            name=ref,
            on_batch=on_batch,
        )

    def _detect_handler(self, ref: str):
        return lambda images: self.worker.detect(self.detectors[ref], images)

    def _encode_handler(self, ref: str):
        return lambda items: self.worker.encode(self.backbones[ref], items)

    # -- models ----------------------------------------------------------------------
    def backbone(self, ref: str | None) -> LoadedBackbone:
        """A name, name@version, alias (vilbert / lxmert) or None (the default)."""
        if not self.ready:
            raise Unavailable(self.state)
        ref = ref or self.settings.default_model
        if ref is None:
            return next(iter(self.backbones.values()))
        if ref in self.backbones:
            return self.backbones[ref]
        for loaded in self.backbones.values():
            m = loaded.manifest
            if ref == m.name or (ref in ALIASES and m.kind == ref):
                return loaded
        known = ", ".join(self.backbones) or "none"
        raise NotFound(f"model {ref!r} is not loaded here; loaded: {known}")

    def list_models(self) -> list[dict]:
        return [
            {
                "name": b.manifest.name,
                "version": str(b.manifest.version),
                "backbone": b.manifest.kind,
                "tasks": list(b.manifest.tasks or []),
                "detector": b.manifest.detector,
                "metrics": b.manifest.metrics or {},
            }
            for b in self.backbones.values()
        ]

    # -- stages ----------------------------------------------------------------------
    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.stage_seconds.labels(stage).observe(time.perf_counter() - start)

    async def decode(self, data: bytes) -> DecodedImage:
        with self._timed("decode"):
            return await asyncio.to_thread(decode_image, data, self.settings.max_image_pixels)

    async def regions(self, backbone: LoadedBackbone, image: DecodedImage) -> DetectedRegions:
        ref = backbone.manifest.detector
        key = (image.sha256, ref)
        hit = key in self.cache
        self.metrics.cache.labels("hit" if hit else "miss").inc()

        async def detect() -> DetectedRegions:
            with self._timed("detect"):
                return await self._detect[ref].submit(image.image, timeout=self.settings.timeout_s)

        return await self.cache.get_or_compute(key, detect)

    async def encode(self, backbone: LoadedBackbone, items: list[EncodeItem]) -> list:
        with self._timed("encode"):
            return await self._encode[backbone.manifest.ref].submit_many(
                items, timeout=self.settings.timeout_s
            )

    async def _prepare(self, data: bytes, model: str | None):
        backbone = self.backbone(model)
        image = await self.decode(data)
        return backbone, await self.regions(backbone, image)

    # -- tasks -----------------------------------------------------------------------
    async def vqa(self, data: bytes, questions: list[str], model: str | None, top_k: int) -> dict:
        backbone, regions = await self._prepare(data, model)
        items = [EncodeItem("vqa", q, regions.region_set) for q in questions]
        logits = await self.encode(backbone, items)
        answers = []
        for q, row in zip(questions, logits, strict=True):
            probs = torch.sigmoid(row)
            top = torch.topk(probs, min(top_k, len(probs)))
            answers.append(
                {
                    "question": q,
                    "answers": [
                        {"answer": backbone.answers[i], "score": round(float(p), 6)}
                        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                    ],
                }
            )
        return {"model": backbone.manifest.ref, "regions": region_list(regions), "answers": answers}

    async def match(self, data: bytes, texts: list[str], model: str | None) -> dict:
        backbone, regions = await self._prepare(data, model)
        items = [EncodeItem("match", t, regions.region_set) for t in texts]
        logits = await self.encode(backbone, items)
        scores = torch.sigmoid(torch.tensor(logits)).tolist()
        return {
            "model": backbone.manifest.ref,
            "scores": [
                {"text": t, "score": round(s, 6)} for t, s in zip(texts, scores, strict=True)
            ],
        }

    async def ground(self, data: bytes, expressions: list[str], model: str | None) -> dict:
        backbone, regions = await self._prepare(data, model)
        items = [EncodeItem("ground", e, regions.region_set) for e in expressions]
        results = []
        for expr, logits in zip(expressions, await self.encode(backbone, items), strict=True):
            probs = torch.softmax(logits, -1)
            i = int(probs.argmax())
            results.append(
                {
                    "expression": expr,
                    "box": _box(regions.boxes[i]),
                    "score": round(float(probs[i]), 6),
                    "region_index": i,
                }
            )
        return {"model": backbone.manifest.ref, "results": results}


def region_list(regions: DetectedRegions) -> list[dict]:
    return [
        {"box": _box(box), "label": label, "score": round(float(score), 6), "attributes": attrs}
        for box, label, score, attrs in zip(
            regions.boxes, regions.labels, regions.scores, regions.attributes, strict=True
        )
    ]


def _box(box) -> list[float]:
    return [round(float(v), 2) for v in box]
