"""Dynamic batching under load: the service against itself with max_batch_size=1, and
against the same model's raw batched forward in one process without HTTP.

    .venv/bin/python -m bench.batching [--model lxmert] [--rounds 3] [--seconds 3]

Two `uvicorn` processes serve the same model: (a) dynamic batching (max_batch_size 32)
and (b) max_batch_size 1. A client in this process drives POST /v1/vqa (one question
a request) at concurrency 1, 8 and 32:
  cached  each request names one of 32 images whose regions the service has cached;
  cold    each request sends an image that service has never seen: the detector runs.
(c), the limit, runs here: `Worker.encode` (collate + model.answer + outputs to the CPU,
what the service runs per batch) on cached regions at batch sizes 1, 8 and 32, and for
cold images decode + detector + encode.

`--baseline DIR` also serves the dynamic configuration from the `service` package of
another source tree (a copy from before a change: `git archive HEAD | tar -x -C DIR`), as
config `baseline`, interleaved with the others: `targets.change` gives dynamic/baseline.
`--concurrency`, `--modes` and `--configs` run a part of the grid.

The machine is shared and noisy, so every cell (config x mode x concurrency) runs once
per round, the configurations back to back, and `--rounds` rounds: throughputs are the
median over rounds, latency percentiles pool all rounds, and each ratio is also given
per round. CPU seconds per answer (server process, client, raw) are recorded too: they
move much less with the other processes' load than wall-clock throughput does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from bench.common import (
    RESULTS,
    ServiceProcess,
    describe_weights,
    latency_stats,
    loadavg,
    machine,
    process_cpu_s,
    ratio,
    shapes_images,
    shipped_detector,
    write_demo_store,
    write_json,
)

CONCURRENCY = (1, 8, 32)  # also the raw forward's batch sizes
RAW_ONLY = (16,)  # a batch of 16: what the service forms at concurrency 32 (two halves)
CACHED_IMAGES = 32
SERVICES = {"dynamic": 32, "max_batch_1": 1}  # name -> max_batch_size
MODES = ("cached", "cold")


def vqa_body(png: bytes, question: str, model: str) -> bytes:
    image = base64.b64encode(png).decode()
    return json.dumps({"image": image, "questions": [question], "model": model}).encode()


# ---- the HTTP clients ----------------------------------------------------------------------


class BareConnection:
    """One HTTP/1.1 keep-alive connection that posts prebuilt JSON bodies: a load
    generator should leave the shared CPU to the service (httpx spends 3 to 6 ms of
    CPU a request here, half what the service spends on an answer)."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length = None
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError("a response without Content-Length")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class HttpxConnection:
    """The same through an httpx.AsyncClient (one per connection)."""

    def __init__(self, url: str):
        import httpx

        self.client = httpx.AsyncClient(base_url=url, timeout=120)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        reply = await self.client.post(
            path, content=body, headers={"content-type": "application/json"}
        )
        return reply.status_code, reply.content

    async def close(self) -> None:
        await self.client.aclose()


CLIENTS = {"bare": BareConnection, "httpx": HttpxConnection}


async def drive(
    url: str, bodies, concurrency: int, seconds: float, warmup: float, client: str = "bare"
) -> tuple[dict, list[float]]:
    """POST bodies (an iterator; exhausted = stop) from `concurrency` connections.

    Returns (stats, latencies) of the measured part: the first `warmup` seconds run but
    are not counted; throughput counts answers (200s) from the end of the warm-up to
    the last completion. The first measured reply is parsed and checked.
    """
    latencies: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    last = measure_from

    async def client_loop(conn) -> None:
        nonlocal last
        while loop.time() < stop_at and (body := next(bodies, None)) is not None:
            t0 = loop.time()
            status, data = await conn.post("/v1/vqa", body)
            t1 = loop.time()
            if t0 < measure_from:
                continue
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
                continue
            if not latencies and not json.loads(data)["answers"][0]["answers"]:
                raise RuntimeError(f"a reply without answers: {data[:200]!r}")
            latencies.append(t1 - t0)
            last = max(last, t1)

    connections = [CLIENTS[client](url) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(client_loop(c) for c in connections))
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    elapsed = max(last - measure_from, 1e-9)
    stats = {"answers_per_s": round(len(latencies) / elapsed, 2), "errors": errors}
    return stats, latencies


def batch_sizes(url: str, ref: str) -> tuple[float, float]:
    """(items, batches) so far of the model's encode batcher, from /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.labels.get("batcher") == ref and s.name.startswith("vqa_batch_size_"):
                values[s.name] = s.value
    return values.get("vqa_batch_size_sum", 0.0), values.get("vqa_batch_size_count", 0.0)


def service_cell(args, service: ServiceProcess, ref: str, bodies, concurrency: int) -> tuple:
    """One measured cell against a running service: (row, latencies)."""
    before = batch_sizes(service.url, ref)
    cpu = process_cpu_s(service.proc.pid), time.process_time()
    stats, latencies = asyncio.run(
        drive(service.url, bodies, concurrency, args.seconds, args.warmup, args.client)
    )
    server_cpu = process_cpu_s(service.proc.pid) - cpu[0]
    client_cpu = time.process_time() - cpu[1]
    after = batch_sizes(service.url, ref)
    answers, batches = after[0] - before[0], after[1] - before[1]  # warm-up included
    return {
        **stats,
        "n": len(latencies),
        "p50_ms": latency_stats(latencies).get("p50_ms"),
        "mean_batch": round(answers / batches, 2) if batches else 0.0,
        "server_cpu_ms_per_answer": round(1000 * server_cpu / max(1.0, answers), 2),
        "client_cpu_ms_per_answer": round(1000 * client_cpu / max(1.0, answers), 2),
    }, latencies


# ---- the raw forward -----------------------------------------------------------------------


class RawForward:
    """(c): the worker's batch calls in this process, no HTTP, no batcher."""

    def __init__(self, store_root: Path, ref: str, cached, cold):
        from service.runtime.images import decode_image
        from service.runtime.worker import EncodeItem, Worker, resolve
        from service.store import ModelStore

        store = ModelStore(store_root)
        self.worker = Worker("cpu")
        manifest = resolve(store, ref)
        self.detector = self.worker.load_detector(store, resolve(store, manifest.detector))
        self.backbone = self.worker.load_backbone(store, manifest, self.detector)
        pixels = [decode_image(png, 1 << 30).image for png, _ in cached]
        regions = self.worker.detect(self.detector, pixels)
        self.items = [
            EncodeItem("vqa", q, r.region_set) for (_, q), r in zip(cached, regions, strict=True)
        ]
        self.cold = itertools.cycle(cold)  # no cache here: an image seen before costs the same
        self._item, self._decode = EncodeItem, decode_image

    def cached_step(self, b: int, i: int) -> None:
        batch = [self.items[(i * b + j) % len(self.items)] for j in range(b)]
        self.worker.encode(self.backbone, batch)

    def cold_step(self, b: int, i: int) -> None:
        fresh = list(itertools.islice(self.cold, b))
        images = [self._decode(png, 1 << 30).image for png, _ in fresh]
        found = self.worker.detect(self.detector, images)
        items = [self._item("vqa", q, r.region_set) for (_, q), r in zip(fresh, found, strict=True)]
        self.worker.encode(self.backbone, items)

    def cell(self, mode: str, b: int, seconds: float) -> tuple[dict, list[float]]:
        step = self.cached_step if mode == "cached" else self.cold_step
        step(b, 0)  # warm-up
        times, cpu, i = [], time.process_time(), 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or i < 3:
            t0 = time.perf_counter()
            step(b, i)
            times.append(time.perf_counter() - t0)
            i += 1
        return {
            "answers_per_s": round(b * len(times) / sum(times), 2),
            "n": len(times),
            "p50_ms": latency_stats(times)["p50_ms"],
            "cpu_ms_per_answer": round(1000 * (time.process_time() - cpu) / (b * i), 2),
        }, times

    def close(self) -> None:
        self.worker.close()


# ---- the run -------------------------------------------------------------------------------


def run_rounds(args, store: Path, ref: str, cached, cold) -> tuple[list, dict]:
    """All cells, `args.rounds` times; returns (per-round rows, pooled latencies by cell)."""
    rows, pooled = [], {}
    cached_bodies = [vqa_body(png, q, ref) for png, q in cached]
    cold_bodies = [vqa_body(png, q, ref) for png, q in cold]
    with tempfile.TemporaryDirectory() as data, ExitStack() as stack:
        configs = {name: (SERVICES[name], args.max_wait_ms, None) for name in args.configs}
        if args.extra_wait is not None:
            configs[f"dynamic_wait{args.extra_wait:g}"] = (32, args.extra_wait, None)
        if args.baseline is not None:
            configs["baseline"] = (SERVICES["dynamic"], args.max_wait_ms, args.baseline)
        services = {
            name: stack.enter_context(
                service_process(store, Path(data) / name, ref, max_batch, max_wait, tree)
            )
            for name, (max_batch, max_wait, tree) in configs.items()
        }
        fresh = {name: iter(cold_bodies) for name in services}  # one cache per service
        for service in services.values():  # cache the regions of the cached images
            asyncio.run(drive(service.url, iter(cached_bodies), 1, 1e9, 0.0))
        raw = RawForward(store, ref, cached, cold)
        stack.callback(raw.close)
        grid = itertools.product(range(args.rounds), args.concurrency, args.modes)
        for r, concurrency, mode in grid:
            for name, service in services.items():
                bodies = itertools.cycle(cached_bodies) if mode == "cached" else fresh[name]
                cell, lat = service_cell(args, service, ref, bodies, concurrency)
                rows.append({"round": r, "config": name, "mode": mode, "concurrency": concurrency})
                rows[-1].update(cell)
                pooled.setdefault((name, mode, concurrency), []).extend(lat)
                print(json.dumps(rows[-1]), flush=True)
            for b in (concurrency, *RAW_ONLY) if concurrency == 32 else (concurrency,):
                cell, lat = raw.cell(mode, b, args.raw_seconds)
                rows.append({"round": r, "config": "raw", "mode": mode, "concurrency": b})
                rows[-1].update(cell)
                pooled.setdefault(("raw", mode, b), []).extend(lat)
                print(json.dumps(rows[-1]), flush=True)
    return rows, pooled


def service_process(
    store: Path, data: Path, ref: str, max_batch: int, max_wait: float, tree: Path | None
) -> ServiceProcess:
    """A service on `ref`; tree: serve the `service` package found there, not this one."""
    service = ServiceProcess(
        store,
        data,
        log_path=data.with_suffix(".log"),
        models=[ref],
        max_batch_size=max_batch,
        max_wait_ms=max_wait,
    )
    if tree is not None:
        service.env["UVICORN_APP_DIR"] = str(Path(tree).resolve())  # uvicorn's --app-dir
    return service


def summarise(rows: list, pooled: dict) -> list:
    """One row per cell: median throughput and CPU over rounds, percentiles over all."""
    out = []
    for (config, mode, concurrency), latencies in pooled.items():
        cells = [
            r
            for r in rows
            if (r["config"], r["mode"], r["concurrency"]) == (config, mode, concurrency)
        ]
        row = {"config": config, "mode": mode, "concurrency": concurrency}
        for key in cells[0]:
            if key.endswith(("_per_s", "_per_answer")) or key == "mean_batch":
                row[key] = round(statistics.median(c[key] for c in cells), 2)
        row.update(latency_stats(latencies))  # raw: the latency of one batch call
        row["errors"] = sum(sum(c.get("errors", {}).values()) for c in cells)
        out.append(row)
    return out


def find(rows: list, config: str, mode: str, concurrency: int) -> dict:
    """The row of one cell ({} when that cell did not run)."""
    key = (config, mode, concurrency)
    return next((r for r in rows if (r["config"], r["mode"], r["concurrency"]) == key), {})


def ratios(rows: list, mode: str) -> dict:
    """Issue 7 section 2's batching ratios for one mode, from `rows` (None: not run)."""
    dyn32, one32 = find(rows, "dynamic", mode, 32), find(rows, "max_batch_1", mode, 32)
    raw32, raw16 = find(rows, "raw", mode, 32), find(rows, "raw", mode, 16)
    dyn1, raw1 = find(rows, "dynamic", mode, 1), find(rows, "raw", mode, 1)
    base32 = find(rows, "baseline", mode, 32)
    out = {
        "batching_speedup_c32": ratio(dyn32.get("answers_per_s"), one32.get("answers_per_s")),
        "share_of_raw_c32": ratio(dyn32.get("answers_per_s"), raw32.get("answers_per_s")),
        "share_of_raw_bs16_c32": ratio(dyn32.get("answers_per_s"), raw16.get("answers_per_s")),
        "cpu_share_of_raw_c32": ratio(
            raw32.get("cpu_ms_per_answer"), dyn32.get("server_cpu_ms_per_answer")
        ),
        "c1_p50_overhead_ms": None,
    }
    if dyn1.get("p50_ms") is not None and raw1.get("p50_ms") is not None:
        out["c1_p50_overhead_ms"] = round(dyn1["p50_ms"] - raw1["p50_ms"], 2)
    if base32:
        out["change_throughput_c32"] = ratio(dyn32["answers_per_s"], base32["answers_per_s"])
        out["baseline_share_of_raw_c32"] = ratio(
            base32["answers_per_s"], raw32.get("answers_per_s")
        )
        out["change_server_cpu_c32"] = ratio(
            dyn32["server_cpu_ms_per_answer"], base32["server_cpu_ms_per_answer"]
        )
    return out


def targets(summary: list, rows: list, rounds: int) -> dict:
    modes = sorted({r["mode"] for r in rows})
    per_round = {
        mode: [ratios([r for r in rows if r["round"] == k], mode) for k in range(rounds)]
        for mode in modes
    }
    result = {}
    for mode in modes:
        overall = ratios(summary, mode)
        result[mode] = {
            **overall,
            "per_round": {k: [p[k] for p in per_round[mode]] for k in per_round[mode][0]},
        }
    cached = result.get("cached", {})
    met = {
        "batching_speedup_c32 >= 3": (cached.get("batching_speedup_c32"), lambda v: v >= 3),
        "share_of_raw_c32 >= 0.8": (cached.get("share_of_raw_c32"), lambda v: v >= 0.8),
        "c1_p50_overhead_ms <= 10": (cached.get("c1_p50_overhead_ms"), lambda v: v <= 10),
    }
    result["met"] = {k: test(v) for k, (v, test) in met.items() if v is not None}
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="lxmert", help="backbone kind, or a name in --store")
    p.add_argument("--store", type=Path, default=None, help="a model store (default: demo size)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=0.5, help="uncounted seconds per cell")
    p.add_argument("--raw-seconds", type=float, default=2.0)
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the batcher's max_wait_ms")
    p.add_argument("--threads", type=int, default=1, help="torch threads, service and raw")
    p.add_argument(
        "--extra-wait",
        type=float,
        default=None,
        help="also serve max_batch_size 32 with this max_wait_ms (a third service)",
    )
    p.add_argument("--random-detector", action="store_true", help="not the trained shapes-detector")
    p.add_argument("--client", choices=sorted(CLIENTS), default="bare")
    p.add_argument("--cold-images", type=int, default=1500, help="fresh images in the pool")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--configs", nargs="+", choices=list(SERVICES), default=list(SERVICES))
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a source tree whose `service` package also serves the dynamic config",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "batching_cpu.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the services' torch threads
    load_start, t_start = loadavg(), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / "model_store"
        trained = None if args.random_detector else shipped_detector()
        if args.store is None:
            refs = write_demo_store(store, kinds=(args.model,), trained_detector=trained)
        if args.store is None:
            ref = refs[args.model]
        else:  # the batchers' metrics are labelled name@version
            from service.store import ModelStore

            ref = ModelStore(store).resolve(args.model).ref
        cached = shapes_images(CACHED_IMAGES, split="val")
        cold = shapes_images(args.cold_images, split="test")
        rows, pooled = run_rounds(args, store, ref, cached, cold)
    summary = summarise(rows, pooled)
    result = {
        "benchmark": "batching",
        "command": " ".join(["python -m bench.batching", *(argv or sys.argv[1:])]),
        "model": ref,
        "weights": describe_weights(trained) if args.store is None else f"from {args.store}",
        "device": "cpu",
        "threads": args.threads,
        "client": args.client,
        "settings": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("out", "store")
        },
        "machine": machine(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "wall_s": round(time.time() - t_start, 1),
        "summary": summary,
        "targets": targets(summary, rows, args.rounds),
        "rounds": rows,
    }
    write_json(args.out, result)
    print(json.dumps(result["targets"], indent=2))
    return result


if __name__ == "__main__":
    main()
