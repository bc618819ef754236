"""The dynamic batcher, tested with fake handlers (no model), as LitServe tests its loop."""

import asyncio
import concurrent.futures
import threading
import time

import pytest

from service.runtime.batcher import (
    BatcherClosed,
    BatchFailed,
    DynamicBatcher,
    QueueFull,
    RequestTimeout,
)

pytestmark = pytest.mark.timeout(10)  # a broken batching loop must fail, not hang


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Doubler:
    """A blocking batch handler: doubles numbers, records every batch it is given.

    gate: when set up, the handler blocks on its first call until `release()`, so that
    requests pile up in the queue behind a busy handler. -1 is a poison item.
    """

    def __init__(self, sleep: float = 0.0, gated: bool = False, drop_one_if=None):
        self.sleep = sleep
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.drop_one_if = drop_one_if

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        self.gate.wait(5)
        time.sleep(self.sleep)
        if -1 in items:
            raise ValueError("poison item")
        out = [2 * x for x in items]
        if self.drop_one_if is not None and self.drop_one_if in items:
            out.pop()
        return out

    @property
    def seen(self) -> list[int]:
        return [x for b in self.batches for x in b]

    async def wait_entered(self):
        assert await asyncio.to_thread(self.entered.wait, 5), "handler never started"

    def release(self):
        self.gate.set()


async def start_busy(batcher: DynamicBatcher, handler: Doubler) -> asyncio.Task:
    """Submit item 0 and wait until the (gated) handler is running it."""
    first = asyncio.create_task(batcher.submit(0))
    await handler.wait_entered()
    return first


async def enqueue(batcher: DynamicBatcher, items, **kw) -> list[asyncio.Task]:
    """One task per item, started in order and queued by the time this returns."""
    tasks = [asyncio.create_task(batcher.submit(x, **kw)) for x in items]
    await asyncio.sleep(0.01)
    return tasks


@pytest.mark.anyio
async def test_concurrent_requests_share_calls_and_match_unbatched_results():
    handler = Doubler(sleep=0.02)
    async with DynamicBatcher(handler, max_batch_size=16, max_wait_ms=10) as batcher:
        results = await asyncio.gather(*(batcher.submit(x) for x in range(40)))
    assert results == [Doubler()([x])[0] for x in range(40)]
    assert len(handler.batches) < 40
    assert sorted(handler.seen) == list(range(40))


@pytest.mark.anyio
async def test_batches_respect_max_size_and_fill_at_once_under_load():
    handler = Doubler(gated=True)
    sizes = []
    async with DynamicBatcher(
        handler, max_batch_size=8, max_wait_ms=50, on_batch=lambda n, s: sizes.append(n)
    ) as batcher:
        first = await start_busy(batcher, handler)
        tasks = await enqueue(batcher, range(1, 21))
        assert batcher.queue_depth == 20
        released = time.perf_counter()
        handler.release()
        results = await asyncio.gather(first, *tasks)
        elapsed = time.perf_counter() - released
    assert results == [2 * x for x in range(21)]
    assert [len(b) for b in handler.batches] == [1, 8, 8, 4]
    assert sizes == [1, 8, 8, 4]
    # queued items waited longer than max_wait already: no batch waits another 50 ms
    assert elapsed < 0.05
    assert batcher.batches == 4 and batcher.items == 21


@pytest.mark.anyio
async def test_a_lone_request_after_a_lone_one_runs_at_once():
    handler = Doubler()
    async with DynamicBatcher(handler, max_batch_size=32, max_wait_ms=200) as batcher:
        await batcher.submit(1)  # warm the executor thread; a batch of one
        start = time.perf_counter()
        assert await batcher.submit(21) == 42
        latency = time.perf_counter() - start
    assert latency < 0.1  # no caller overlapped: it did not wait the 200 ms


@pytest.mark.anyio
async def test_after_overlapping_callers_a_request_waits_max_wait_and_no_longer():
    handler = Doubler()
    async with DynamicBatcher(handler, max_batch_size=32, max_wait_ms=50) as batcher:
        assert await asyncio.gather(batcher.submit(1), batcher.submit(2)) == [2, 4]  # batch of 2
        start = time.perf_counter()
        assert await batcher.submit(21) == 42
        latency = time.perf_counter() - start
    assert 0.045 <= latency < 0.3
    assert [len(b) for b in handler.batches] == [2, 1]


@pytest.mark.anyio
async def test_full_batch_does_not_wait_for_max_wait():
    handler = Doubler()
    async with DynamicBatcher(handler, max_batch_size=4, max_wait_ms=2000) as batcher:
        start = time.perf_counter()
        assert await batcher.submit_many([1, 2, 3, 4]) == [2, 4, 6, 8]
    assert time.perf_counter() - start < 0.5
    assert handler.batches == [[1, 2, 3, 4]]


@pytest.mark.anyio
async def test_queue_full_is_raised_at_once_and_queued_requests_still_finish():
    handler = Doubler(gated=True)
    async with DynamicBatcher(handler, max_batch_size=2, max_wait_ms=1, max_queue=4) as batcher:
        first = await start_busy(batcher, handler)
        tasks = await enqueue(batcher, [1, 2, 3, 4])
        start = time.perf_counter()
        with pytest.raises(QueueFull) as full:
            await batcher.submit(5)
        assert time.perf_counter() - start < 0.05
        assert full.value.retry_after_s > 0
        assert batcher.queue_depth == 4
        handler.release()
        assert await asyncio.gather(first, *tasks) == [0, 2, 4, 6, 8]
    assert 5 not in handler.seen


@pytest.mark.anyio
async def test_submit_many_is_all_or_nothing_and_lands_in_one_batch():
    handler = Doubler(gated=True)
    async with DynamicBatcher(handler, max_batch_size=8, max_wait_ms=1, max_queue=4) as batcher:
        first = await start_busy(batcher, handler)
        tasks = await enqueue(batcher, [1, 2])
        with pytest.raises(QueueFull):
            await batcher.submit_many([10, 11, 12])  # 2 + 3 > 4: none of them queued
        assert batcher.queue_depth == 2
        many = asyncio.create_task(batcher.submit_many([20, 21]))
        await asyncio.sleep(0.01)
        handler.release()
        assert await many == [40, 42]
        await asyncio.gather(first, *tasks)
    assert handler.batches == [[0], [1, 2, 20, 21]]


@pytest.mark.anyio
async def test_timed_out_request_raises_and_never_reaches_the_handler():
    handler = Doubler(gated=True)
    async with DynamicBatcher(handler, max_batch_size=4, max_wait_ms=1) as batcher:
        first = await start_busy(batcher, handler)
        start = time.perf_counter()
        with pytest.raises(RequestTimeout):
            await batcher.submit(7, timeout=0.05)
        assert 0.04 < time.perf_counter() - start < 0.5
        assert batcher.queue_depth == 0
        handler.release()
        assert await first == 0
        assert await batcher.submit(8, timeout=1) == 16
    assert 7 not in handler.seen


@pytest.mark.anyio
async def test_timeout_while_running_still_raises():
    handler = Doubler(sleep=0.2)
    async with DynamicBatcher(handler, max_wait_ms=1) as batcher:
        with pytest.raises(RequestTimeout):
            await batcher.submit(3, timeout=0.05)
        assert await batcher.submit(4) == 8  # the loop survived the abandoned batch


@pytest.mark.anyio
async def test_cancelled_request_never_reaches_the_handler():
    handler = Doubler(gated=True)
    async with DynamicBatcher(handler, max_batch_size=4, max_wait_ms=1) as batcher:
        first = await start_busy(batcher, handler)
        gone, kept = await enqueue(batcher, [7, 8])
        gone.cancel()
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 1
        handler.release()
        assert await kept == 16
        await first
        with pytest.raises(asyncio.CancelledError):
            await gone
    assert 7 not in handler.seen


@pytest.mark.anyio
async def test_request_cancelled_while_its_batch_waits_for_a_shared_executor_is_dropped():
    # Two batchers share one device thread; b's batch waits there while a's handler runs.
    handler_a, handler_b = Doubler(gated=True), Doubler()
    device = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    a = DynamicBatcher(handler_a, max_wait_ms=1, executor=device, name="a")
    b = DynamicBatcher(handler_b, max_wait_ms=1, executor=device, name="b")
    async with a, b:
        first = await start_busy(a, handler_a)
        gone, kept = await enqueue(b, [7, 8])  # taken into a batch, queued on the device
        assert b.queue_depth == 0
        gone.cancel()
        await asyncio.sleep(0.01)
        handler_a.release()
        assert await kept == 16
        await first
    device.shutdown()
    assert handler_b.batches == [[8]]


@pytest.mark.anyio
async def test_batchers_sharing_an_executor_never_run_handlers_at_once():
    lock = threading.Lock()
    overlaps = []

    def exclusive(items):
        if not lock.acquire(blocking=False):
            overlaps.append(items)
            return items
        time.sleep(0.005)
        lock.release()
        return items

    device = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    a = DynamicBatcher(exclusive, max_batch_size=4, max_wait_ms=1, executor=device)
    b = DynamicBatcher(exclusive, max_batch_size=4, max_wait_ms=1, executor=device)
    async with a, b:
        out = await asyncio.gather(*(x.submit(i) for i in range(16) for x in (a, b)))
    device.shutdown()
    assert out == [i for i in range(16) for _ in (a, b)]
    assert overlaps == []


@pytest.mark.anyio
async def test_failing_batch_fails_only_its_own_requests():
    handler = Doubler(gated=True)
    async with DynamicBatcher(handler, max_batch_size=3, max_wait_ms=1) as batcher:
        first = await start_busy(batcher, handler)
        tasks = await enqueue(batcher, [1, -1, 2, 3, 4])
        handler.release()
        results = await asyncio.gather(first, *tasks, return_exceptions=True)
        assert results[0] == 0
        for err in results[1:4]:
            assert isinstance(err, BatchFailed)
            assert isinstance(err.__cause__, ValueError)
        assert results[1] is not results[2]  # one exception object per request
        assert results[4:] == [6, 8]
        assert batcher.running
        assert await batcher.submit(5) == 10
    assert handler.batches == [[0], [1, -1, 2], [3, 4], [5]]


@pytest.mark.anyio
async def test_wrong_output_count_fails_only_that_batch():
    handler = Doubler(gated=True, drop_one_if=99)
    async with DynamicBatcher(handler, max_batch_size=2, max_wait_ms=1) as batcher:
        first = await start_busy(batcher, handler)
        tasks = await enqueue(batcher, [99, 1, 2, 3])
        handler.release()
        results = await asyncio.gather(first, *tasks, return_exceptions=True)
    assert results[0] == 0
    assert all(isinstance(r, BatchFailed) for r in results[1:3])
    assert results[3:] == [4, 6]


@pytest.mark.anyio
async def test_stop_with_drain_finishes_queued_requests_and_refuses_new_ones():
    handler = Doubler(gated=True)
    batcher = DynamicBatcher(handler, max_batch_size=2, max_wait_ms=1)
    await batcher.start()
    first = await start_busy(batcher, handler)
    tasks = await enqueue(batcher, [1, 2, 3])
    stopping = asyncio.create_task(batcher.stop(drain=True))
    await asyncio.sleep(0.01)
    with pytest.raises(BatcherClosed):
        await batcher.submit(4)
    assert not stopping.done()
    handler.release()
    assert await asyncio.gather(first, *tasks) == [0, 2, 4, 6]
    await stopping
    assert not batcher.running
    assert 4 not in handler.seen


@pytest.mark.anyio
async def test_stop_without_drain_fails_queued_requests_but_finishes_the_running_batch():
    handler = Doubler(gated=True)
    batcher = DynamicBatcher(handler, max_batch_size=2, max_wait_ms=1)
    await batcher.start()
    first = await start_busy(batcher, handler)
    tasks = await enqueue(batcher, [1, 2])
    stopping = asyncio.create_task(batcher.stop(drain=False))
    await asyncio.sleep(0.01)
    handler.release()
    await stopping
    assert await first == 0
    for t in tasks:
        with pytest.raises(BatcherClosed):
            await t
    assert handler.seen == [0]


@pytest.mark.anyio
async def test_submit_before_start_is_refused():
    batcher = DynamicBatcher(Doubler())
    with pytest.raises(BatcherClosed):
        await batcher.submit(1)
