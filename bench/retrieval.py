"""Caption search over galleries of 1,000 and 10,000 shapes-world images: the two-stage
search (faiss over single-modality embeddings, top 50 rescored by the cross-attention
head) against scoring every image with the cross-attention head.

    .venv/bin/python -m bench.retrieval [--model lxmert] [--store DIR]
        [--data DIR --features DIR] [--sizes 1000 10000]

What is measured. The gallery is filled directly through `GalleryStorage` (what
POST /v1/galleries/{name}/images stores: embedding, float16 region features, boxes),
not through HTTP. Region sets come from `--features` (a `vqa features` file of the
split) or, when absent, from the model's detector run here on `--distinct` images of
`--data` (default: generated with `write_split`). A gallery larger than the distinct
images tiles them (image i of the gallery is distinct image i mod D, stored under its
own id): search latency depends on the gallery's size, not on its content, but R@1 is
then computed over the distinct images (a copy of a right image counts as right).

The two-stage search is the service's own code in this process: `Galleries.search`
through a started `Engine` (text embedding, faiss, SQLite reads of the 50 region sets,
the alignment head through the batcher), and again through HTTP against a `uvicorn`
process on the same data. The exhaustive search is that head on every (caption, image)
pair at its best: 64 pairs a `Worker.encode` call, region sets already in memory (no
SQLite reads, no batcher), so the speed-up reported is a lower bound. Queries are the
first captions of the first distinct images. With random weights R@1 means nothing: it
is reported as pending until `--store` and `--model` name trained models.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.common import (
    RESULTS,
    ServiceProcess,
    describe_weights,
    latency_stats,
    loadavg,
    machine,
    ratio,
    shipped_detector,
    write_demo_store,
    write_json,
)

# ---- the gallery's contents ----------------------------------------------------------------


def load_distinct(args, store_root: Path, ref: str, tmp: Path):
    """(records, region sets) of the distinct images: from a feature file, or detected here."""
    from service.data.records import load_records
    from service.data.shapes import write_split

    data = args.data
    if data is None or not (Path(data) / f"{args.split}.jsonl").exists():
        data = tmp / "shapes"
        write_split(data, args.split, args.distinct, progress=False)
    records = load_records(data, args.split)[: args.distinct]
    if args.features and (Path(args.features) / f"{args.split}.safetensors").exists():
        from service.training.examples import PairSource

        source = PairSource.load(data, args.features, args.split)
        n = min(args.distinct, len(source))
        return source.records[:n], [source.region_set(i) for i in range(n)], "feature file"
    return records, detect(store_root, ref, data, records), "detector run by the benchmark"


def detect(store_root: Path, ref: str, data: Path, records: list) -> list:
    from PIL import Image

    from service.runtime.worker import Worker, resolve
    from service.store import ModelStore

    store = ModelStore(store_root)
    worker = Worker("cpu")
    detector = worker.load_detector(store, resolve(store, resolve(store, ref).detector))
    out = []
    for i in range(0, len(records), 64):
        images = [Image.open(Path(data) / r["image"]).convert("RGB") for r in records[i : i + 64]]
        out += [d.region_set for d in worker.detect(detector, images)]
    worker.close()
    return out


def fill_gallery(engine, name: str, ref: str, regions: list, size: int) -> tuple[float, int]:
    """Store `size` images (distinct image i % D under id g<i>); (seconds, embedding width)."""
    from service.gallery.storage import StoredImage

    start = time.perf_counter()
    backbone = engine.backbone(ref)
    embeddings = np.concatenate(
        [
            engine.worker.embed_images(backbone, regions[i : i + 64])
            for i in range(0, len(regions), 64)
        ]
    )
    engine.galleries.storage.create(name, backbone.manifest.ref)  # bound to name@version
    for lo in range(0, size, 1000):
        batch = []
        for g in range(lo, min(size, lo + 1000)):
            d = g % len(regions)
            rs = regions[d]
            batch.append(
                StoredImage(
                    f"g{g:06d}", f"{g:064x}", embeddings[d], rs.features.numpy(), rs.boxes.numpy()
                )
            )
        engine.galleries.storage.add(name, batch)
    return time.perf_counter() - start, embeddings.shape[1]


# ---- searching -----------------------------------------------------------------------------


async def two_stage(engine, http, name: str, queries: list[str], rerank: int) -> tuple:
    """Galleries.search in this process and POST .../search to the service, query by query
    (paired, so that both see the same load): (in-process latencies, HTTP latencies,
    ranked gallery indices of the in-process search)."""
    here, there, ranked = [], [], []
    url = f"/v1/galleries/{name}/search"
    for caption in queries:
        t0 = time.perf_counter()
        reply = await engine.galleries.search(name, caption, k=10, rerank=rerank)
        t1 = time.perf_counter()
        (await http.post(url, json={"caption": caption, "rerank": rerank})).raise_for_status()
        there.append(time.perf_counter() - t1)
        here.append(t1 - t0)
        ranked.append([int(hit["id"][1:]) for hit in reply["results"]])
    return here, there, ranked


def exhaustive(engine, ref: str, regions: list, size: int, queries: list[str]) -> tuple:
    """(latencies, ranked ids): the alignment head on every (caption, gallery image) pair,
    64 pairs a `Worker.encode` call, regions already in memory: exhaustive at its best."""
    from service.runtime.worker import EncodeItem

    backbone = engine.backbone(ref)
    latencies, ranked = [], []
    for caption in queries:
        t0 = time.perf_counter()
        scores = []
        for lo in range(0, size, 64):
            items = [
                EncodeItem("match", caption, regions[g % len(regions)])
                for g in range(lo, min(size, lo + 64))
            ]
            scores += engine.worker.encode(backbone, items)
        top = np.argsort(-np.asarray(scores), kind="stable")[:10]
        latencies.append(time.perf_counter() - t0)
        ranked.append(top.tolist())
    return latencies, ranked


def recall(ranked: list, relevant: list, distinct: int) -> dict:
    from service.training.metrics import recall_at_k

    as_distinct = [[g % distinct for g in row] for row in ranked]
    return recall_at_k(as_distinct, relevant[: len(ranked)], (1, 5, 10))


async def measure(args, store: Path, ref: str, url: str, data_dir: Path, regions, queries, rel):
    """Fill each gallery, then time both searches (the service at `url` shares data_dir)."""
    from service.config import Settings
    from service.runtime.engine import Engine

    engine = Engine(Settings(store=store, data_dir=data_dir, device="cpu", models=[ref]))
    await engine.start()
    out = []
    try:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            for size in args.sizes:
                out.append(await measure_size(args, engine, http, ref, size, regions, queries, rel))
                print(json.dumps(out[-1]), flush=True)
    finally:
        await engine.stop()
    return out


async def measure_size(args, engine, http, ref: str, size: int, regions, queries, rel) -> dict:
    name = f"bench{size}"
    fill_s, dim = await asyncio.to_thread(fill_gallery, engine, name, ref, regions, size)
    t0 = time.perf_counter()
    probe = np.ones(dim, np.float32)
    await asyncio.to_thread(engine.galleries.storage.nearest, name, probe, 1)
    index_s = time.perf_counter() - t0  # the faiss index is built from SQLite on first use
    await two_stage(engine, http, name, queries[:1], args.rerank)  # warm-up, both sides
    here, there, ranked = await two_stage(engine, http, name, queries, args.rerank)
    n_ex = args.exhaustive_queries if size <= 1000 else args.exhaustive_queries_large
    every, every_ranked = await asyncio.to_thread(
        exhaustive, engine, ref, regions, size, queries[:n_ex]
    )
    d = len(regions)
    return {
        "gallery_size": size,
        "distinct_images": d,
        "fill_s": round(fill_s, 1),
        "index_build_s": round(index_s, 2),
        "two_stage": latency_stats(here),
        "two_stage_http": latency_stats(there),
        "exhaustive": latency_stats(every),
        "speedup_p50": ratio(latency_stats(every)["p50_ms"], latency_stats(here)["p50_ms"]),
        "recall": {
            "two_stage": recall(ranked, rel, d),
            "exhaustive": recall(every_ranked, rel, d),
            "two_stage_on_exhaustive_queries": recall(ranked[:n_ex], rel, d),
        },
    }


def r1_gap(row: dict) -> dict:
    """Two-stage R@1 minus exhaustive R@1, in points, on the queries both ran."""
    two = row["recall"]["two_stage_on_exhaustive_queries"]["R@1"]
    every = row["recall"]["exhaustive"]["R@1"]
    gap = round(100 * (two - every), 2)
    return {"points": gap, "queries": row["exhaustive"]["n"], "met": gap >= -1}


# ---- main ----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="lxmert", help="backbone kind (demo) or a name in --store")
    p.add_argument("--store", type=Path, default=None, help="a model store (default: demo size)")
    p.add_argument("--data", type=Path, default=None, help="shapes data folder (default: made)")
    p.add_argument("--features", type=Path, default=None, help="`vqa features` folder")
    p.add_argument("--split", default="test")
    p.add_argument("--distinct", type=int, default=1000, help="distinct images at most")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--rerank", type=int, default=50)
    p.add_argument("--queries", type=int, default=30, help="two-stage queries per gallery")
    p.add_argument("--exhaustive-queries", type=int, default=3, help="at <= 1,000 images")
    p.add_argument("--exhaustive-queries-large", type=int, default=1, help="above 1,000")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--random-detector", action="store_true", help="not the trained shapes-detector")
    p.add_argument("--out", type=Path, default=RESULTS / "retrieval_cpu.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from service.training.evaluate import relevant_images

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    load_start, t_start = loadavg(), time.time()
    trained = args.store is not None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = args.store or tmp / "model_store"
        detector = None if args.random_detector else shipped_detector()
        if not trained:
            refs = write_demo_store(store, (args.model,), trained_detector=detector)
        ref = args.model if trained else refs[args.model]
        records, regions, origin = load_distinct(args, store, ref, tmp)
        queries = [r["captions"][0] for r in records[: args.queries]]
        relevant = relevant_images(queries, [r["objects"] for r in records])
        data_dir = tmp / "data"
        with ServiceProcess(store, data_dir, models=[ref]) as service:
            rows = asyncio.run(
                measure(args, store, ref, service.url, data_dir, regions, queries, relevant)
            )
    for row in rows:
        if not trained:
            row["recall"] = {"pending trained models": row["recall"]}
    largest = rows[-1]
    result = {
        "benchmark": "retrieval",
        "command": " ".join(["python -m bench.retrieval", *(argv or sys.argv[1:])]),
        "model": ref,
        "weights": f"from {args.store}"
        if trained
        else describe_weights(detector) + ": R@1 means nothing",
        "regions": origin,
        "device": "cpu",
        "threads": args.threads,
        "machine": machine(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "wall_s": round(time.time() - t_start, 1),
        "galleries": rows,
        "target": {
            f"two-stage >= 20x faster than exhaustive at {largest['gallery_size']}": largest[
                "speedup_p50"
            ],
            "met": (largest["speedup_p50"] or 0) >= 20,
            "R@1 within 1 point": r1_gap(largest) if trained else "pending trained models",
        },
    }
    write_json(args.out, result)
    print(json.dumps(result["target"]))
    return result


if __name__ == "__main__":
    main()
