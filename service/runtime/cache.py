"""The region-feature cache: later questions about an image skip the detector.

Keys are (sha256 of the image bytes, detector "name@version"): a new detector version
never serves regions another version found. Values are whatever the pipeline stores per
image (regions, boxes, labels); they are shared between requests, so never modify one
in place. `get`/`put` are thread-safe; `get_or_compute` runs on one event loop and
coalesces concurrent misses, so two requests for the same new image detect it once.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any, Generic, TypeVar

V = TypeVar("V")
CacheKey = tuple[str, str]  # (sha256 hex of the image bytes, detector "name@version")


def region_key(image_bytes: bytes, detector_ref: str) -> CacheKey:
    """The cache key of an image as the detector `detector_ref` sees it."""
    return hashlib.sha256(image_bytes).hexdigest(), detector_ref


def nbytes_of(value: Any) -> int:
    """Bytes held by the tensors and arrays in `value` (dataclasses, dicts, lists walked)."""
    if hasattr(value, "element_size") and hasattr(value, "numel"):  # torch.Tensor
        return value.element_size() * value.numel()
    if hasattr(value, "nbytes"):  # numpy array
        return int(value.nbytes)
    if is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes_of(getattr(value, f.name)) for f in fields(value))
    if isinstance(value, Mapping):
        return sum(nbytes_of(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(nbytes_of(v) for v in value)
    return 0


class RegionCache(Generic[V]):
    """An LRU of per-image detector outputs, bounded in entries and optionally in bytes.

    max_entries: most images kept. max_bytes: most bytes kept, measured by `size_of`
    (default `nbytes_of`); a value larger than max_bytes is not cached at all.
    Counters `hits`, `misses` (of get) and `coalesced` (misses that waited on another
    request's computation instead of computing) feed /metrics.
    """

    def __init__(
        self,
        max_entries: int = 1024,
        max_bytes: int | None = None,
        size_of: Callable[[V], int] = nbytes_of,
    ):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size_of = size_of
        self._items: OrderedDict[CacheKey, tuple[V, int]] = OrderedDict()  # LRU first
        self._lock = threading.Lock()
        self._inflight: dict[CacheKey, _Flight] = {}  # event-loop side only
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: CacheKey) -> bool:
        """Membership without touching the LRU order or the counters."""
        return key in self._items

    def get(self, key: CacheKey) -> V | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: CacheKey, value: V) -> None:
        size = self.size_of(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            if self.max_bytes is not None and size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self.nbytes += size
            while len(self._items) > self.max_entries or (
                self.max_bytes is not None and self.nbytes > self.max_bytes
            ):
                _, (_, evicted) = self._items.popitem(last=False)
                self.nbytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    async def get_or_compute(self, key: CacheKey, compute: Callable[[], Awaitable[V]]) -> V:
        """The cached value, or `await compute()` stored under `key`.

        Concurrent misses on one key share one computation. A cancelled caller stops
        waiting; the computation is cancelled only when every caller has gone. If it
        raises, every waiting caller gets the error and nothing is cached.
        """
        value = self.get(key)
        if value is not None:
            return value
        flight = self._inflight.get(key)
        if flight is None:
            flight = _Flight(asyncio.ensure_future(self._compute_and_put(key, compute)))
            self._inflight[key] = flight
            flight.task.add_done_callback(lambda _: self._land(key, flight))
        else:
            self.coalesced += 1
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            flight.waiters -= 1
            if flight.waiters == 0:  # nobody wants it: stop, and let the next caller restart
                flight.task.cancel()
                self._land(key, flight)
            raise

    async def _compute_and_put(self, key: CacheKey, compute: Callable[[], Awaitable[V]]) -> V:
        value = await compute()
        self.put(key, value)
        return value

    def _land(self, key: CacheKey, flight: _Flight) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if flight.task.done() and not flight.task.cancelled():
            flight.task.exception()  # mark retrieved: the waiters were told


class _Flight:
    """One computation in progress and how many callers await it."""

    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Future):
        self.task = task
        self.waiters = 0
