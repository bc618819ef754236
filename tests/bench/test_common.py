"""The benchmarks' shared pieces: the demo-size store, images, statistics, the service
in a subprocess."""

from __future__ import annotations

import httpx
import pytest

from bench.common import (
    ServiceProcess,
    demo_config,
    latency_stats,
    process_cpu_s,
    shapes_images,
    write_demo_store,
)
from service.store import ModelStore

pytestmark = pytest.mark.timeout(120)


def test_latency_stats_are_percentiles_in_milliseconds():
    stats = latency_stats([i / 1000 for i in range(1, 101)])  # 1 .. 100 ms
    assert stats["n"] == 100
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p95_ms"] == pytest.approx(95.05)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert latency_stats([]) == {"n": 0}


def test_shapes_images_are_distinct_pngs_with_a_question():
    images = shapes_images(5)
    assert len({png for png, _ in images}) == 5
    assert all(png.startswith(b"\x89PNG") and q.endswith("?") for png, q in images)
    assert shapes_images(2, start=3) == images[3:5]  # image i is the same wherever drawn


def test_demo_store_holds_the_shipped_sizes_with_its_detector(tmp_path):
    refs = write_demo_store(tmp_path / "store", kinds=("lxmert",))
    store = ModelStore(tmp_path / "store")
    lxmert = store.resolve(refs["lxmert"])
    assert lxmert.detector == refs["detector"]
    assert lxmert.config == demo_config("lxmert", 256)  # the tiny detector's 256-d regions
    assert (lxmert.config["hidden_size"], lxmert.config["l_layers"]) == (192, 2)
    assert store.resolve(refs["detector"]).config["max_regions"] == 36


def test_service_process_serves_the_store_and_stops(tiny_store, tmp_path):
    store, refs = tiny_store
    with ServiceProcess(store, tmp_path / "data", models=[refs["lxmert"]]) as service:
        pid = service.proc.pid
        models = httpx.get(f"{service.url}/v1/models").json()
        assert [m["name"] for m in models] == ["tiny-lxmert"]
        assert process_cpu_s(pid) > 0
    assert service.proc.returncode is not None  # SIGTERM ended it


def test_the_trained_detector_is_copied_in_when_the_repository_has_one(
    tiny_store, tmp_path, monkeypatch
):
    import bench.common

    store, refs = tiny_store
    monkeypatch.setattr(bench.common, "SHIPPED_STORE", tmp_path / "nothing here")
    assert bench.common.shipped_detector() is None
    monkeypatch.setattr(bench.common, "SHIPPED_STORE", store)
    monkeypatch.setattr(bench.common, "SHIPPED_DETECTOR", "tiny-detector")
    shipped = bench.common.shipped_detector()
    assert shipped == refs["detector"]

    demo = write_demo_store(tmp_path / "demo", kinds=("lxmert",), trained_detector=shipped)
    ours, theirs = ModelStore(tmp_path / "demo"), ModelStore(store)
    copied = ours.load_tensors(ours.resolve(demo["detector"]))
    original = theirs.load_tensors(theirs.resolve(shipped))
    assert copied.keys() == original.keys()
    assert all(copied[k].equal(original[k]) for k in copied)
    assert ours.resolve(demo["lxmert"]).config["visual_feat_dim"] == 32  # its region size
