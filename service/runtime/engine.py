"""The engine: models, batchers, cache and galleries behind the API's async calls.

bytes -> decode and check -> sha256 -> feature cache? -> detector batch -> regions ->
encoder batch (across requests, one model) -> heads -> answers. Each stage is timed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from contextlib import asynccontextmanager, contextmanager

import torch

from service.config import Settings
from service.errors import Conflict, NotFound, ServiceError, Unavailable
from service.gallery.service import Galleries
from service.gallery.storage import Rebound
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
from service.store import Manifest, ModelStore

log = logging.getLogger("vqa.engine")
ALIASES = ("vilbert", "lxmert")


class ReloadFailed(ServiceError):
    """The store's newest version of a model could not be loaded; the old one still serves."""

    code = "reload_failed"


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
        # Replaced by a reload, kept loaded while galleries still search with them.
        self._retiring: dict[str, LoadedBackbone] = {}
        self._detect: dict[str, DynamicBatcher] = {}
        self._encode: dict[str, DynamicBatcher] = {}
        self._users: Counter[str] = Counter()  # requests now holding each backbone ref
        self._reload_lock = asyncio.Lock()
        self.galleries = Galleries(self, settings.data_dir)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # -- life cycle ------------------------------------------------------------------
    async def start(self) -> None:
        self.worker = Worker(self.settings.device)
        await asyncio.to_thread(self._load_models)
        for ref, detector in self.detectors.items():
            self._detect[ref] = await self._started(ref, self._detect_handler(detector))
        for ref, backbone in self.backbones.items():
            self._encode[ref] = await self._started(ref, self._encode_handler(backbone))
        for backbone in self.backbones.values():  # galleries left on a version no longer served
            for gallery, ref, exc in await self._move_galleries(backbone):
                log.error("gallery %s stays bound to %s: %s", gallery, ref, exc)
        self.state = "ready"
        log.info("ready on %s with %s", self.worker.device, ", ".join(self.backbones))

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Refuse new requests (503); let those in flight finish, within drain_timeout."""
        if self.state in ("draining", "stopped"):
            return
        self.state = "draining"
        try:
            async with asyncio.timeout(drain_timeout):
                await self._unused(*self._users)
                batchers = (*self._detect.values(), *self._encode.values())
                await asyncio.gather(*(b.stop(drain=True) for b in batchers))
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
        if not manifests:
            raise NotFound(
                f"the model store {self.store.root} holds no ViLBERT or LXMERT model; "
                "train one (vqa train ...) or point VQA_STORE / --store at a store that has one"
            )
        for m in manifests:
            detector, self.backbones[m.ref] = self._load(m)
            if detector is not None:
                self.detectors[detector.manifest.ref] = detector

    def _load(self, manifest) -> tuple[LoadedDetector | None, LoadedBackbone]:
        """On the worker thread: a backbone, and its detector when not loaded yet."""
        if manifest.detector is None:
            raise NotFound(f"model {manifest.ref} names no detector in its manifest")
        detector = self.detectors.get(manifest.detector)
        if detector is not None:
            return None, self.worker.load_backbone(self.store, manifest, detector)
        detector = self.worker.load_detector(self.store, resolve(self.store, manifest.detector))
        return detector, self.worker.load_backbone(self.store, manifest, detector)

    async def _started(self, ref: str, handler) -> DynamicBatcher:
        batcher = self._batcher(ref, handler)
        await batcher.start()
        return batcher

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

    def _detect_handler(self, detector: LoadedDetector):
        return lambda images: self.worker.detect(detector, images)

    def _encode_handler(self, backbone: LoadedBackbone):
        # Bound to this loaded model, so a reload cannot change a queued batch's model.
        return lambda items: self.worker.encode(backbone, items)

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
        return [_model_info(b) for b in self.backbones.values()]

    @asynccontextmanager
    async def _serving(self, model: str | None):
        """The backbone for `model`, held for one request: reload and stop wait for it."""
        async with self._held(self.backbone(model)) as backbone:
            yield backbone

    @asynccontextmanager
    async def gallery_model(self, ref: str):
        """The backbone a gallery is bound to (exactly `ref`), held for one request.

        During a reload that may be the replaced version: it stays loaded until every
        gallery bound to it has been re-indexed onto the new one. A version not loaded here
        may be one another replica's reload moved the gallery to: see `_catch_up`.
        """
        if not self.ready:
            raise Unavailable(self.state)
        backbone = self.backbones.get(ref) or self._retiring.get(ref) or await self._catch_up(ref)
        async with self._held(backbone):
            yield backbone

    @asynccontextmanager
    async def _held(self, backbone: LoadedBackbone):
        ref = backbone.manifest.ref
        self._users[ref] += 1
        try:
            yield backbone
        finally:
            self._users[ref] -= 1

    async def _unused(self, *refs: str) -> None:
        """Wait until no request holds any of `refs`."""
        while any(self._users[r] for r in refs):
            await asyncio.sleep(0.01)

    async def reload(self, name: str) -> dict:
        """Serve the store's newest version of `name` in place of the loaded one.

        It loads on the worker thread (between batches) and is swapped in at once; requests
        that already hold the old version finish on it. Then every gallery bound to the old
        version is re-embedded with the new one from its stored region features and rebound
        to it in one transaction; until its commit a gallery searches with the old version,
        which stays loaded until no gallery is bound to it, then its batcher drains. A
        version that reads another detector's regions is refused (Conflict) while galleries
        hold the old detector's. When a re-index fails, that gallery stays on the old
        version (still loaded) and ReloadFailed says so; reloading again retries it.
        """
        async with self._reload_lock:
            return await self._reload(name)

    async def _reload(self, name: str) -> dict:
        """`reload`, under the reload lock."""
        old = self.backbone(name)
        if old.manifest.name != name:
            raise NotFound(f"no model named {name!r} is loaded; loaded: {list(self.backbones)}")
        manifest = await asyncio.to_thread(resolve, self.store, name)
        if manifest.ref == old.manifest.ref:
            await self._moved_or_raise(old)  # a re-index that failed before
            return _model_info(old)
        await self._check_galleries_can_move(old.manifest, manifest)
        loop = asyncio.get_running_loop()
        try:
            detector, new = await loop.run_in_executor(self.worker.executor, self._load, manifest)
        except Exception as exc:
            raise ReloadFailed(
                f"cannot load {manifest.ref} ({exc}); still serving {old.manifest.ref}"
            ) from exc
        if detector is not None:
            ref = detector.manifest.ref
            self._detect[ref] = await self._started(ref, self._detect_handler(detector))
            self.detectors[ref] = detector
        self._encode[manifest.ref] = await self._started(manifest.ref, self._encode_handler(new))
        self._retiring[old.manifest.ref] = old  # before the swap: galleries never miss it
        self.backbones = {  # one assignment: a request sees the old set or the new one
            (manifest.ref if r == old.manifest.ref else r): (new if b is old else b)
            for r, b in self.backbones.items()
        }
        log.info("reloaded %s -> %s", old.manifest.ref, manifest.ref)
        await self._moved_or_raise(new)
        return _model_info(new)

    async def _check_galleries_can_move(self, old: Manifest, new: Manifest) -> None:
        if new.detector == old.detector:
            return
        bindings = await asyncio.to_thread(self.galleries.storage.bindings)
        if bound := sorted(g for g, r in bindings.items() if r == old.ref):
            raise Conflict(
                f"{new.ref} reads regions of detector {new.detector}, but galleries "
                f"{', '.join(bound)} hold regions of {old.detector}; {old.ref} keeps serving "
                "(delete those galleries to reload)"
            )

    async def _moved_or_raise(self, backbone: LoadedBackbone) -> None:
        failed = await self._move_galleries(backbone)
        for gallery, ref, exc in failed:
            log.error("gallery %s stays bound to %s: %s", gallery, ref, exc)
        if kept := [(g, e) for g, r, e in failed if r in self._retiring]:
            raise ReloadFailed(
                f"{backbone.manifest.ref} serves now, but galleries "
                f"{', '.join(g for g, _ in kept)} could not be re-indexed for it ({kept[0][1]}); "
                "they keep searching with their old version, which stays loaded; "
                "reload again to retry"
            )

    async def _move_galleries(self, backbone: LoadedBackbone) -> list[tuple[str, str, Exception]]:
        """Re-index onto `backbone` every gallery bound to a version of its model that is not
        served (the one a reload replaced, or one served before a restart) and whose regions
        come from the same detector; retire replaced versions no gallery is bound to.
        Returns (gallery, its ref, error) for each gallery that could not move."""
        m, storage = backbone.manifest, self.galleries.storage
        failed: list[tuple[str, str, Exception]] = []
        for gallery, ref in (await asyncio.to_thread(storage.bindings)).items():
            if ref in self.backbones or ref.rpartition("@")[0] != m.name:
                continue
            if (detector := await self._detector_of(ref)) != m.detector:
                failed.append((gallery, ref, Conflict(f"{ref} read detector {detector}")))
                continue
            try:
                count = await self.galleries.reindex(gallery, ref, backbone)
            except NotFound:
                continue  # deleted meanwhile
            except Rebound:  # another replica on this data dir moved it first
                log.info("gallery %s was moved off %s meanwhile, elsewhere", gallery, ref)
                continue
            except Exception as exc:
                log.exception("re-indexing gallery %s for %s failed", gallery, m.ref)
                failed.append((gallery, ref, exc))
            else:
                log.info("gallery %s: %d images re-indexed %s -> %s", gallery, count, ref, m.ref)
        bound = set((await asyncio.to_thread(storage.bindings)).values())
        for ref in [r for r in self._retiring if r.rpartition("@")[0] == m.name]:
            if ref not in bound:
                await self._retire(ref)
        return failed

    async def _detector_of(self, ref: str) -> str | None:
        if loaded := self._retiring.get(ref):
            return loaded.manifest.detector
        try:
            return (await asyncio.to_thread(resolve, self.store, ref)).detector
        except NotFound:
            return None  # gone from the store: its regions' detector is unknown

    async def _retire(self, ref: str) -> None:
        """Drain a replaced model's batcher once no request holds it (or timeout_s passed)."""
        self._retiring.pop(ref, None)
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                await self._unused(ref)
        except TimeoutError:
            log.warning("retiring %s while requests still hold it", ref)
        await self._encode[ref].stop(drain=True)
        del self._encode[ref]
        self._users.pop(ref, None)

    # -- replicas that share the store and the data dir ---------------------------------
    async def _catch_up(self, ref: str) -> LoadedBackbone:
        """A gallery is bound to `ref`, a version not loaded here. Replicas share the store
        and the galleries, so another replica's reload moves galleries under this one:

        - `ref` is the store's newest version of a model served here in an older one: reload
          it here too (`reload`, once however many requests ask), then serve it;
        - the version served here is the store's newest and `ref` an older one (a replica
          that had not reloaded yet made the gallery): re-index galleries onto it, as a
          reload does; Rebound asks the caller to read the gallery's new binding.

        Anything else is NotFound.
        """
        name, _, version = ref.rpartition("@")
        async with self._reload_lock:
            if loaded := self.backbones.get(ref) or self._retiring.get(ref):
                return loaded  # a request before this one caught up
            served = self._served(name)
            newest = await asyncio.to_thread(self._newest, name)
            if served is None or newest is None or not version.isdigit():
                raise self._not_here(ref, newest)
            if newest.ref == ref and served.manifest.version < newest.version:
                log.info(
                    "catching up: a gallery is bound to %s, serving %s: reloading",
                    ref,
                    served.manifest.ref,
                )
                await self._reload_to(served)
            elif newest.ref == served.manifest.ref and int(version) < newest.version:
                log.info("catching up: galleries on %s move to %s", ref, newest.ref)
                await self._move_to(served, ref)
            else:
                raise self._not_here(ref, newest)
        if loaded := self.backbones.get(ref):
            return loaded
        raise Rebound(f"the gallery moved from {ref} to {self._served(name).manifest.ref}; retry")

    async def _reload_to(self, old: LoadedBackbone) -> None:
        """Reload `old`'s model. Its new version serves even if some gallery bound to `old`
        could not be re-indexed (logged; that gallery keeps `old`)."""
        try:
            await self._reload(old.manifest.name)
        except ReloadFailed:
            if self._served(old.manifest.name) is old:
                raise  # the new version could not load
            log.warning(
                "caught up with %s; some galleries stay on %s", old.manifest.name, old.manifest.ref
            )

    async def _move_to(self, backbone: LoadedBackbone, ref: str) -> None:
        failed = await self._move_galleries(backbone)
        for gallery, bound, exc in failed:
            log.error("gallery %s stays bound to %s: %s", gallery, bound, exc)
        if stuck := [exc for _, bound, exc in failed if bound == ref]:
            raise NotFound(
                f"the gallery's model {ref} is not loaded here, and galleries on it could "
                f"not be re-indexed for {backbone.manifest.ref}: {stuck[0]}"
            )

    def _served(self, name: str) -> LoadedBackbone | None:
        return next((b for b in self.backbones.values() if b.manifest.name == name), None)

    def _newest(self, name: str) -> Manifest | None:
        try:
            return resolve(self.store, name)
        except NotFound:
            return None

    def _not_here(self, ref: str, newest: Manifest | None) -> NotFound:
        known = ", ".join(self.backbones) or "none"
        newest_is = (
            f"the store's newest is {newest.ref}"
            if newest
            else f"the store has no {ref.rpartition('@')[0]}"
        )
        return NotFound(
            f"the gallery's model {ref} is not loaded here; loaded: {known}; {newest_is}"
        )

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
        batcher = self._encode.get(backbone.manifest.ref)
        if batcher is None:
            raise Unavailable(f"model {backbone.manifest.ref} was replaced by a reload; retry")
        with self._timed("encode"):
            return await batcher.submit_many(items, timeout=self.settings.timeout_s)

    async def _image_regions(self, backbone: LoadedBackbone, data: bytes) -> DetectedRegions:
        """A cached image is not decoded again: the same bytes passed the checks before."""
        key = (await _sha256(data), backbone.manifest.detector)
        if key in self.cache and (hit := self.cache.get(key)) is not None:
            self.metrics.cache.labels("hit").inc()
            return hit
        return await self.regions(backbone, await self.decode(data))

    # -- tasks -----------------------------------------------------------------------
    async def vqa(self, data: bytes, questions: list[str], model: str | None, top_k: int) -> dict:
        async with self._serving(model) as backbone:
            regions = await self._image_regions(backbone, data)
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
        async with self._serving(model) as backbone:
            regions = await self._image_regions(backbone, data)
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
        async with self._serving(model) as backbone:
            regions = await self._image_regions(backbone, data)
            items = [EncodeItem("ground", e, regions.region_set) for e in expressions]
            outputs = await self.encode(backbone, items)
        results = []
        for expr, logits in zip(expressions, outputs, strict=True):
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


async def _sha256(data: bytes) -> str:
    """The cache key's hash; off the event loop when the body is large (~1 ms a MB)."""
    if len(data) < 1 << 20:
        return hashlib.sha256(data).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())


def _model_info(b: LoadedBackbone) -> dict:
    m = b.manifest
    return {
        "name": m.name,
        "version": str(m.version),
        "backbone": m.kind,
        "tasks": list(m.tasks or []),
        "detector": m.detector,
        "metrics": m.metrics or {},
        "match_calibration": m.match_calibration,
    }


def region_list(regions: DetectedRegions) -> list[dict]:
    # tolist() once, not float() per element: the same values, a fraction of the time
    boxes, scores = regions.boxes.tolist(), regions.scores.tolist()
    return [
        {
            "box": [round(v, 2) for v in box],
            "label": label,
            "score": round(score, 6),
            "attributes": attrs,
        }
        for box, label, score, attrs in zip(
            boxes, regions.labels, scores, regions.attributes, strict=True
        )
    ]


def _box(box) -> list[float]:
    return [round(float(v), 2) for v in box]
