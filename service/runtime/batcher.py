"""Dynamic batching: many concurrent requests -> few calls of a blocking batch handler.

A `DynamicBatcher` owns a bounded queue and one asyncio task that forms micro-batches:
up to `max_batch_size` items, or whatever has arrived `max_wait_ms` after the first
queued item arrived, whichever comes first. The handler (a model forward) runs in an
executor thread, never on the event loop, one batch at a time. While it runs, new items
queue up, so under load the next batch is taken full and at once, without waiting.

The contract is LitServe's in miniature: the handler maps `list[In] -> list[Out]`,
one output per input, in order. It knows nothing of HTTP or of the model.

Several batchers (one per model or stage) may share one single-thread executor per
device: their handler calls then never overlap on that device.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class BatcherError(Exception):
    """Base class of the errors a request to a batcher can end with."""


class QueueFull(BatcherError):
    """The bounded queue has no room; retry later (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeout(BatcherError, TimeoutError):
    """The result was not ready within the request's timeout (HTTP 504)."""


class BatchFailed(BatcherError):
    """The handler failed on the batch holding this request; `__cause__` is the original error."""


class BatcherClosed(BatcherError):
    """The batcher is not running (not started, stopping or stopped); nothing was queued."""


class _Entry:
    """One queued request. `cancelled` is a plain bool so the worker thread may read it."""

    __slots__ = ("item", "future", "arrived", "queued", "cancelled")

    def __init__(self, item, future: asyncio.Future, arrived: float):
        self.item = item
        self.future = future
        self.arrived = arrived  # loop.time() at submit
        self.queued = True  # still in the batcher's queue (not yet taken into a batch)
        self.cancelled = False  # the submitter gave up (cancelled or timed out)


class DynamicBatcher(Generic[In, Out]):
    """Batches concurrent `submit` calls into calls of a blocking `handler(list[In]) -> list[Out]`.

    handler: run in `executor` (default: a private single-thread pool) on each batch.
    max_batch_size: most items per handler call.
    max_wait_ms: longest a batch waits to fill, counted from its first item's arrival,
        when the batch before held more than one item. After a lone item a new one runs at
        once: with no sign of concurrent callers, waiting only adds latency (concurrency 1
        pays no max_wait; under load the batches stay full).
    max_queue: most items waiting (not yet in a batch); beyond it `submit` raises QueueFull.
    on_batch: called on the event loop after every handler call with (items, seconds),
        for a batch-size histogram and timings.
    """

    def __init__(
        self,
        handler: Callable[[list[In]], Sequence[Out]],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        executor: concurrent.futures.Executor | None = None,
        name: str = "",
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("need max_batch_size >= 1, max_queue >= 1, max_wait_ms >= 0")
        self.handler = handler
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.name = name or getattr(handler, "__name__", "batcher")
        self.on_batch = on_batch
        self._executor = executor
        self._owns_executor = executor is None
        self._queue: deque[_Entry] = deque()
        self._state = "new"  # new -> running -> closing -> stopped
        self._task: asyncio.Task | None = None
        self._waiter: asyncio.Future | None = None  # the loop sleeps on it
        self._wake_at = 1  # queue length at which submit wakes the sleeping loop
        self._batch_seconds = 0.0  # moving average of handler time, for Retry-After
        self._last_batch = 0  # items in the latest batch: > 1 means callers overlap
        self.batches = 0  # handler calls so far
        self.items = 0  # items that reached the handler so far

    # -- state -----------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (excludes the batch the handler is running)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._state == "running"

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"batcher {self.name!r} already started")
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"batcher-{self.name}"
            )
        self._state = "running"
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self, drain: bool = True) -> None:
        """Refuse new items; finish the queued ones (drain) or fail them with BatcherClosed.

        The batch already in the handler always finishes: a thread cannot be interrupted.
        """
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            return
        self._state = "closing"
        if not drain:
            self._fail_queued()
        self._wake()
        try:
            await self._task
        finally:
            self._state = "stopped"
            if self._owns_executor:
                self._executor.shutdown(wait=False)

    async def __aenter__(self) -> DynamicBatcher[In, Out]:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop(drain=True)

    # -- submitting ------------------------------------------------------------------

    async def submit(self, item: In, timeout: float | None = None) -> Out:
        """The handler's output for `item`, computed in some batch.

        Raises QueueFull at once when the queue is full, RequestTimeout after `timeout`
        seconds (the item is dropped if it has not started), BatchFailed when its batch
        failed, BatcherClosed when not running. A cancelled caller's item is dropped.
        """
        entries = self._enqueue([item])
        try:
            async with asyncio.timeout(timeout):
                return await entries[0].future
        except TimeoutError:
            raise self._timed_out(timeout) from None
        finally:
            self._abandon(entries)

    async def submit_many(self, items: Sequence[In], timeout: float | None = None) -> list[Out]:
        """Outputs for all `items`, queued together (all or none: QueueFull) so that they
        land in as few batches as possible. If one fails, the rest are dropped."""
        entries = self._enqueue(items)
        try:
            async with asyncio.timeout(timeout):
                return list(await asyncio.gather(*(e.future for e in entries)))
        except TimeoutError:
            raise self._timed_out(timeout) from None
        finally:
            self._abandon(entries)

    def _timed_out(self, timeout: float) -> RequestTimeout:
        return RequestTimeout(
            f"{self.name}: no result within {timeout:.3g} s ({self.queue_depth} items waiting)"
        )

    def _enqueue(self, items: Sequence[In]) -> list[_Entry]:
        if self._state != "running":
            raise BatcherClosed(f"batcher {self.name!r} is not running ({self._state})")
        if len(self._queue) + len(items) > self.max_queue:
            raise QueueFull(
                f"{self.name}: queue full ({len(self._queue)} of {self.max_queue} waiting)",
                retry_after_s=self._retry_after(),
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        entries = [_Entry(item, loop.create_future(), now) for item in items]
        self._queue.extend(entries)
        if len(self._queue) >= self._wake_at:
            self._wake()
        return entries

    def _abandon(self, entries: list[_Entry]) -> None:
        """Drop the caller's unfinished entries: out of the queue, skipped by the worker."""
        for e in entries:
            if e.future.done() and not e.future.cancelled():
                continue
            e.cancelled = True
            e.future.cancel()
            if e.queued:
                self._dequeue(e)

    def _retry_after(self) -> float:
        """Seconds until the current queue has likely drained: a Retry-After hint."""
        batches = math.ceil(len(self._queue) / self.max_batch_size)
        return max(0.001, batches * self._batch_seconds)

    # -- the batching loop -----------------------------------------------------------

    async def _run(self) -> None:
        try:
            while batch := await self._next_batch():
                await self._run_batch(batch)
        finally:  # also when cancelled from outside: nobody may wait forever
            self._fail_queued()

    async def _next_batch(self) -> list[_Entry]:
        """Wait for the next batch: full, or due max_wait after its first item arrived.
        An empty list means the batcher is closing and the queue is empty."""
        while True:
            if not await self._batch_due():
                return []
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                e = self._queue.popleft()
                e.queued = False
                if not e.future.done():  # cancelled, its submitter not yet resumed: skip
                    batch.append(e)
            if batch:
                return batch

    async def _batch_due(self) -> bool:
        """Sleep until a batch is due; False when closing with an empty queue."""
        loop = asyncio.get_running_loop()
        while True:
            closing = self._state != "running"
            if not self._queue:
                if closing:
                    return False
                await self._sleep(wake_at=1, deadline=None)
                continue
            if closing or len(self._queue) >= self.max_batch_size:
                return True
            wait = self.max_wait if self._last_batch > 1 else 0.0
            deadline = self._queue[0].arrived + wait
            if loop.time() >= deadline:
                return True
            await self._sleep(wake_at=self.max_batch_size, deadline=deadline)

    async def _sleep(self, wake_at: int, deadline: float | None) -> None:
        """Sleep until the queue holds `wake_at` items, `deadline` passes, or stop()."""
        loop = asyncio.get_running_loop()
        self._wake_at = wake_at
        self._waiter = loop.create_future()
        timer = loop.call_at(deadline, self._wake) if deadline is not None else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _run_batch(self, batch: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        self._last_batch = len(batch)
        start = time.perf_counter()
        try:
            ran, outputs = await loop.run_in_executor(self._executor, self._call_handler, batch)
        except asyncio.CancelledError:  # stop() was cancelled: the thread runs on, unheard
            for e in batch:
                self._fail(e, BatcherClosed(f"batcher {self.name!r} stopped"))
            raise
        except Exception as exc:  # the handler failed: only this batch's requests fail
            log.exception("batcher %s: handler failed on a batch of %d", self.name, len(batch))
            for e in batch:
                err = BatchFailed(f"{self.name}: batch of {len(batch)} failed: {exc!r}")
                err.__cause__ = exc
                self._fail(e, err)
            ran = [e for e in batch if not e.cancelled]
        else:
            for e, out in zip(ran, outputs, strict=True):
                if not e.future.done():
                    e.future.set_result(out)
        seconds = time.perf_counter() - start
        if not ran:
            return
        self.batches += 1
        self.items += len(ran)
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        if self.on_batch is not None:
            try:
                self.on_batch(len(ran), seconds)
            except Exception:
                log.exception("batcher %s: on_batch callback failed", self.name)

    def _call_handler(self, batch: list[_Entry]) -> tuple[list[_Entry], Sequence]:
        """Runs in the executor thread. Entries cancelled while the batch waited for the
        executor (shared with other batchers) are dropped here, just before the call."""
        ran = [e for e in batch if not e.cancelled]
        if not ran:
            return ran, []
        outputs = self.handler([e.item for e in ran])
        if len(outputs) != len(ran):
            raise ValueError(f"handler returned {len(outputs)} outputs for {len(ran)} inputs")
        return ran, outputs

    def _dequeue(self, entry: _Entry) -> None:
        entry.queued = False
        self._queue.remove(entry)

    def _fail_queued(self) -> None:
        while self._queue:
            e = self._queue.popleft()
            e.queued = False
            self._fail(e, BatcherClosed(f"batcher {self.name!r} stopped"))

    @staticmethod
    def _fail(entry: _Entry, exc: BaseException) -> None:
        if not entry.future.done():
            entry.future.set_exception(exc)
