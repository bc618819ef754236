"""The region-feature cache: LRU bounds, counters, keys, coalesced misses."""

import asyncio
import threading

import pytest
import torch

from service.data.collate import RegionSet
from service.runtime.cache import RegionCache, nbytes_of, region_key

pytestmark = pytest.mark.timeout(10)  # a broken batching loop must fail, not hang


@pytest.fixture
def anyio_backend():
    return "asyncio"


def regions(n: int = 4, dim: int = 8, fill: float = 0.0) -> RegionSet:
    return RegionSet(torch.full((n, dim), fill), torch.rand(n, 4))


def test_lru_evicts_the_least_recently_used():
    cache = RegionCache(max_entries=2)
    a, b, c = (region_key(bytes([i]), "det@1") for i in range(3))
    cache.put(a, regions(fill=1))
    cache.put(b, regions(fill=2))
    assert cache.get(a) is not None  # a is now more recent than b
    cache.put(c, regions(fill=3))
    assert len(cache) == 2
    assert b not in cache
    assert cache.get(a).features[0, 0] == 1
    assert cache.get(c).features[0, 0] == 3


def test_hits_and_misses_are_counted():
    cache = RegionCache()
    key = region_key(b"png bytes", "det@1")
    assert cache.get(key) is None
    cache.put(key, regions())
    cache.get(key)
    cache.get(key)
    assert (cache.hits, cache.misses) == (2, 1)


def test_key_is_image_hash_and_detector_version():
    image = b"\x89PNG same image"
    v1, v2 = region_key(image, "det@1"), region_key(image, "det@2")
    assert v1[0] == v2[0] and len(v1[0]) == 64
    assert region_key(b"\x89PNG other image", "det@1") != v1
    cache = RegionCache()
    cache.put(v1, regions())
    assert cache.get(v2) is None
    assert cache.get(v1) is not None


def test_byte_bound_evicts_and_skips_oversized_values():
    one = regions(n=10, dim=8)  # 10*8*4 + 10*4*4 = 480 bytes
    assert nbytes_of(one) == 480
    cache = RegionCache(max_entries=100, max_bytes=1000)
    for i in range(3):
        cache.put(region_key(bytes([i]), "d@1"), regions(n=10, dim=8))
    assert len(cache) == 2 and cache.nbytes == 960
    assert region_key(bytes([0]), "d@1") not in cache
    cache.put(region_key(b"big", "d@1"), regions(n=100, dim=8))
    assert region_key(b"big", "d@1") not in cache
    assert cache.nbytes == 960


def test_threads_share_one_cache_safely():
    cache = RegionCache(max_entries=50, max_bytes=50 * 480)

    def work(seed: int):
        for i in range(200):
            key = region_key(bytes([(seed * 7 + i) % 97]), "d@1")
            if cache.get(key) is None:
                cache.put(key, regions(n=10, dim=8))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) <= 50
    assert cache.nbytes == 480 * len(cache)
    assert cache.hits + cache.misses == 800


@pytest.mark.anyio
async def test_concurrent_misses_on_one_image_compute_once():
    cache = RegionCache()
    calls = []

    async def detect():
        calls.append(1)
        await asyncio.sleep(0.02)
        return regions(fill=5)

    key = region_key(b"new image", "det@1")
    results = await asyncio.gather(*(cache.get_or_compute(key, detect) for _ in range(8)))
    assert len(calls) == 1
    assert all(r is results[0] for r in results)
    assert cache.coalesced == 7
    assert await cache.get_or_compute(key, detect) is results[0]  # a hit: no detector run
    assert len(calls) == 1


@pytest.mark.anyio
async def test_failed_computation_reaches_every_waiter_and_is_not_cached():
    cache = RegionCache()
    key = region_key(b"img", "det@1")

    async def broken():
        await asyncio.sleep(0.01)
        raise RuntimeError("detector down")

    results = await asyncio.gather(
        *(cache.get_or_compute(key, broken) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)
    assert key not in cache

    async def works():
        return regions()

    assert await cache.get_or_compute(key, works) is not None


@pytest.mark.anyio
async def test_cancelled_waiter_leaves_others_served_and_last_one_cancels_the_work():
    cache = RegionCache()
    key = region_key(b"img", "det@1")
    finished = []

    async def slow():
        await asyncio.sleep(0.05)
        finished.append(1)
        return regions()

    gone = asyncio.create_task(cache.get_or_compute(key, slow))
    stays = asyncio.create_task(cache.get_or_compute(key, slow))
    await asyncio.sleep(0.01)
    gone.cancel()
    assert await stays is not None
    assert finished == [1]

    other = region_key(b"another", "det@1")
    alone = asyncio.create_task(cache.get_or_compute(other, slow))
    await asyncio.sleep(0.01)
    alone.cancel()
    await asyncio.sleep(0.08)
    assert finished == [1]  # nobody waited any more: the computation was cancelled
    assert other not in cache
