"""The batching benchmark's client and arithmetic, against a live tiny service."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from bench.batching import BareConnection, drive, ratios, summarise, vqa_body
from service.app import create_app
from tests.support import LiveServer, make_settings, png_bytes

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server(tiny_store, tmp_path_factory):
    store, refs = tiny_store
    app = create_app(make_settings(store, tmp_path_factory.mktemp("data")))
    with LiveServer(app) as live:
        yield live.url, refs["lxmert"]


def test_bare_connection_posts_and_reads_replies_on_one_connection(server):
    url, ref = server

    async def two_posts():
        conn = BareConnection(url)
        first = await conn.post("/v1/vqa", vqa_body(png_bytes(1), "what color?", ref))
        writer = conn.writer
        second = await conn.post("/v1/vqa", b"{not json")
        assert conn.writer is writer  # kept alive
        await conn.close()
        return first, second

    (status, body), (bad, _) = asyncio.run(two_posts())
    assert status == 200 and b'"answers"' in body
    assert bad in (400, 422)


@pytest.mark.parametrize("client", ["bare", "httpx"])
def test_drive_counts_answers_and_errors_apart(server, client):
    url, ref = server
    good = [vqa_body(png_bytes(i), "how many shapes?", ref) for i in range(3)]
    bodies = itertools.islice(itertools.cycle(good + [b"{}"]), 24)  # every 4th is refused
    stats, latencies = asyncio.run(drive(url, bodies, 4, seconds=30, warmup=0, client=client))
    assert len(latencies) == 18 and stats["errors"] == {"422": 6}
    assert stats["answers_per_s"] > 0


def test_ratios_and_summary_follow_the_rows():
    rows = [
        {"round": 0, "config": c, "mode": "cached", "concurrency": n, "answers_per_s": v}
        for c, n, v in [
            ("dynamic", 32, 90.0),
            ("max_batch_1", 32, 30.0),
            ("raw", 32, 100.0),
            ("raw", 16, 95.0),
            ("dynamic", 1, 20.0),
            ("raw", 1, 30.0),
        ]
    ]
    for r in rows:
        r["p50_ms"] = {("dynamic", 1): 40.0, ("raw", 1): 31.0}.get((r["config"], r["concurrency"]))
    got = ratios(rows, "cached")
    assert got["batching_speedup_c32"] == 3.0
    assert got["share_of_raw_c32"] == 0.9
    assert got["share_of_raw_bs16_c32"] == pytest.approx(0.947, abs=1e-3)
    assert got["c1_p50_overhead_ms"] == 9.0
    second = [{**r, "round": 1, "answers_per_s": 2 * r["answers_per_s"]} for r in rows]
    pooled = {(r["config"], r["mode"], r["concurrency"]): [0.01, 0.02] for r in rows}
    summary = summarise(rows + second, pooled)
    dyn = next(r for r in summary if (r["config"], r["concurrency"]) == ("dynamic", 32))
    assert dyn["answers_per_s"] == 135.0  # median of 90 and 180
    assert dyn["p50_ms"] == 15.0
