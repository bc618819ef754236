"""Dynamic batching under load: the service against itself with max_batch_size=1, and
against the same model's raw batched forward in one process without HTTP.

    .venv/bin/python -m bench.batching [--model lxmert] [--seconds 6] [--store DIR]

For each service configuration (a: dynamic batching, max_batch_size 32; b: the same
service with max_batch_size 1) a fresh `uvicorn` process serves the model and an async
httpx client in this process drives POST /v1/vqa (one question per request) at
concurrency 1, 8 and 32, for `--seconds` each after a warm-up:
  cached  every request names one of 32 images whose regions the service has cached;
  cold    every request sends an image the service has never seen: the detector runs.
Then (c), the limit: `Worker.encode` (collate + model.answer, what the service runs per
batch) on cached regions at batch sizes 1, 8 and 32, and for cold images decode +
detector + encode. All in one run, so that the ratios compare like with like on a noisy
machine; results in bench/results/batching_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (
    RESULTS,
    ServiceProcess,
    latency_stats,
    loadavg,
    machine,
    process_cpu_s,
    ratio,
    shapes_images,
    write_demo_store,
    write_json,
)

CONCURRENCY = (1, 8, 32)
BATCH_SIZES = (1, 8, 32)
CACHED_IMAGES = 32
SERVICES = {"dynamic": 32, "max_batch_1": 1}  # name -> max_batch_size


def vqa_body(png: bytes, question: str, model: str) -> bytes:
    image = base64.b64encode(png).decode()
    return json.dumps({"image": image, "questions": [question], "model": model}).encode()


# ---- the HTTP client -----------------------------------------------------------------------


async def drive(url: str, bodies, concurrency: int, seconds: float, warmup: float) -> dict:
    """POST bodies (an iterator; exhausted = stop) at `concurrency`; stats of the measured part.

    The first `warmup` seconds are run but not counted. Throughput counts answers (200s)
    from the end of the warm-up to the last completion.
    """
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    last = measure_from

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal last
        while loop.time() < stop_at:
            body = next(bodies, None)
            if body is None:
                return
            t0 = loop.time()
            reply = await client.post("/v1/vqa", content=body, headers=headers)
            t1 = loop.time()
            if t0 < measure_from:
                continue
            if reply.status_code == 200:
                latencies.append(t1 - t0)
                last = max(last, t1)
            else:
                errors[str(reply.status_code)] = errors.get(str(reply.status_code), 0) + 1

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    elapsed = max(last - measure_from, 1e-9)
    return {
        "answers_per_s": round(len(latencies) / elapsed, 2),
        "seconds": round(elapsed, 2),
        **latency_stats(latencies),
        "errors": errors,
    }


def batch_size_mean(url: str, ref: str) -> tuple[float, float]:
    """(sum, count) of the encode batcher's batch-size histogram, from /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.labels.get("batcher") == ref and s.name == "vqa_batch_size_sum":
                total = s.value
            if s.labels.get("batcher") == ref and s.name == "vqa_batch_size_count":
                count = s.value
    return total, count


def service_cells(args, store: Path, ref: str, name: str, max_batch: int, cached, cold) -> list:
    """Every (mode, concurrency) cell against one fresh service process."""
    rows = []
    cached_bodies = [vqa_body(png, q, ref) for png, q in cached]
    cold_bodies = iter([vqa_body(png, q, ref) for png, q in cold])
    with tempfile.TemporaryDirectory() as data_dir:
        service = ServiceProcess(
            store,
            Path(data_dir),
            log_path=Path(data_dir) / "service.log",
            models=[ref],
            max_batch_size=max_batch,
            max_wait_ms=args.max_wait_ms,
        )
        with service:
            # Warm the cache with the cached images (one request each, in order).
            asyncio.run(drive(service.url, iter(cached_bodies), 1, 1e9, 0.0))
            for concurrency in CONCURRENCY:
                for mode in ("cached", "cold"):
                    bodies = itertools.cycle(cached_bodies) if mode == "cached" else cold_bodies
                    before = batch_size_mean(service.url, ref)
                    cpu = process_cpu_s(service.proc.pid), time.process_time()
                    cell = asyncio.run(
                        drive(service.url, bodies, concurrency, args.seconds, args.warmup)
                    )
                    server_cpu = process_cpu_s(service.proc.pid) - cpu[0]
                    client_cpu = time.process_time() - cpu[1]
                    after = batch_size_mean(service.url, ref)
                    batches = after[1] - before[1]
                    cell["mean_batch"] = round((after[0] - before[0]) / batches, 2) if batches else 0
                    # CPU per answer over the whole cell (warm-up too): what the other
                    # processes' load changes least
                    requests = after[0] - before[0]  # one question per request
                    cell["server_cpu_ms_per_answer"] = round(1000 * server_cpu / max(1, requests), 2)
                    cell["client_cpu_ms_per_answer"] = round(1000 * client_cpu / max(1, requests), 2)
                    rows.append({"config": name, "mode": mode, "concurrency": concurrency, **cell})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- the raw forward -----------------------------------------------------------------------


def raw_cells(args, store_root: Path, ref: str, cached, cold) -> list:
    """(c): the worker's batch calls in this process, no HTTP, no batcher, one thread."""
    from service.runtime.images import decode_image
    from service.runtime.worker import EncodeItem, Worker, resolve
    from service.store import ModelStore

    store = ModelStore(store_root)
    worker = Worker("cpu")
    manifest = resolve(store, ref)
    detector = worker.load_detector(store, resolve(store, manifest.detector))
    backbone = worker.load_backbone(store, manifest, detector)
    pixels = [decode_image(png, 1 << 30).image for png, _ in cached]
    regions = worker.detect(detector, pixels)
    items = [EncodeItem("vqa", q, r.region_set) for (_, q), r in zip(cached, regions, strict=True)]
    cold_iter = iter(cold)

    def encode(b: int, i: int) -> None:
        batch = [items[(i * b + j) % len(items)] for j in range(b)]
        worker.encode(backbone, batch)

    def decode_detect_encode(b: int, i: int) -> None:
        fresh = list(itertools.islice(cold_iter, b))
        images = [decode_image(png, 1 << 30) for png, _ in fresh]
        found = worker.detect(detector, [im.image for im in images])
        worker.encode(
            backbone,
            [EncodeItem("vqa", q, r.region_set) for (_, q), r in zip(fresh, found, strict=True)],
        )

    rows = []
    for mode, step in (("cached", encode), ("cold", decode_detect_encode)):
        for b in BATCH_SIZES:
            step(b, 0)  # warm-up
            times, start, cpu = [], time.perf_counter(), time.process_time()
            i = 0
            while time.perf_counter() - start < args.raw_seconds or i < 3:
                t0 = time.perf_counter()
                step(b, i)
                times.append(time.perf_counter() - t0)
                i += 1
            cell = {"config": "raw", "mode": mode, "batch_size": b}
            cell["answers_per_s"] = round(b * len(times) / sum(times), 2)
            cell["cpu_ms_per_answer"] = round(1000 * (time.process_time() - cpu) / (b * i), 2)
            rows.append({**cell, **latency_stats(times)})
            print(json.dumps(rows[-1]), flush=True)
    worker.close()
    return rows


# ---- targets -------------------------------------------------------------------------------


def find(rows: list, **key) -> dict:
    return next(r for r in rows if all(r.get(k) == v for k, v in key.items()))


def targets(rows: list) -> dict:
    """Issue 7 section 2, from this run's rows (cached images unless named)."""
    dyn32 = find(rows, config="dynamic", mode="cached", concurrency=32)
    one32 = find(rows, config="max_batch_1", mode="cached", concurrency=32)
    raw32 = find(rows, config="raw", mode="cached", batch_size=32)
    dyn1 = find(rows, config="dynamic", mode="cached", concurrency=1)
    raw1 = find(rows, config="raw", mode="cached", batch_size=1)
    speedup = ratio(dyn32["answers_per_s"], one32["answers_per_s"])
    share = ratio(dyn32["answers_per_s"], raw32["answers_per_s"])
    overhead = round(dyn1["p50_ms"] - raw1["p50_ms"], 2)
    cold = {
        "batching_speedup_c32": ratio(
            find(rows, config="dynamic", mode="cold", concurrency=32)["answers_per_s"],
            find(rows, config="max_batch_1", mode="cold", concurrency=32)["answers_per_s"],
        ),
        "share_of_raw_c32": ratio(
            find(rows, config="dynamic", mode="cold", concurrency=32)["answers_per_s"],
            find(rows, config="raw", mode="cold", batch_size=32)["answers_per_s"],
        ),
        "c1_p50_overhead_ms": round(
            find(rows, config="dynamic", mode="cold", concurrency=1)["p50_ms"]
            - find(rows, config="raw", mode="cold", batch_size=1)["p50_ms"],
            2,
        ),
    }
    return {
        "batching_speedup_c32": {"value": speedup, "target": ">= 3", "met": (speedup or 0) >= 3},
        "share_of_raw_c32": {"value": share, "target": ">= 0.8", "met": (share or 0) >= 0.8},
        "c1_p50_overhead_ms": {"value": overhead, "target": "<= 10", "met": overhead <= 10},
        "cold_images": cold,
    }


# ---- main ----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="lxmert", help="backbone kind, or a name in --store")
    p.add_argument("--store", type=Path, default=None, help="a model store (default: demo size)")
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds per cell")
    p.add_argument("--raw-seconds", type=float, default=3.0)
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the batcher's max_wait_ms")
    p.add_argument("--threads", type=int, default=1, help="torch threads, service and raw")
    p.add_argument("--cold-images", type=int, default=1500, help="fresh images in the pool")
    p.add_argument("--out", type=Path, default=RESULTS / "batching_cpu.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # the service gets the same through OMP_NUM_THREADS
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    load_start, t_start = loadavg(), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / "model_store"
        refs = write_demo_store(store, kinds=(args.model,)) if args.store is None else {}
        ref = refs.get(args.model, args.model)
        cached = shapes_images(CACHED_IMAGES, split="val")
        cold = shapes_images(args.cold_images, split="test")
        rows = []
        for name, max_batch in SERVICES.items():
            rows += service_cells(args, store, ref, name, max_batch, cached, cold)
        rows += raw_cells(args, store, ref, cached, cold)
    result = {
        "benchmark": "batching",
        "command": " ".join(["python -m bench.batching", *(sys.argv[1:] if argv is None else argv)]),
        "model": ref,
        "weights": "random (demo size, service.training.pretrain.default_config)"
        if args.store is None
        else f"from {args.store}",
        "device": "cpu",
        "threads": args.threads,
        "max_wait_ms": args.max_wait_ms,
        "machine": machine(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "wall_s": round(time.time() - t_start, 1),
        "rows": rows,
        "targets": targets(rows),
    }
    write_json(args.out, result)
    print(json.dumps(result["targets"], indent=2))
    return result


if __name__ == "__main__":
    main()
