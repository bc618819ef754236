"""The region-feature cache: the first question about an image against the later ones.

    .venv/bin/python -m bench.cache [--images 30] [--later 5] [--resnet-images 8]

For each case (detector, image size) a `uvicorn` process serves a demo-size model with
random weights; one client (concurrency 1) sends, for each of `--images` new shapes-world
images, one question (the first: decode + detector + encoder) and then `--later` other
questions about the same image (cached regions: encoder only). Reported: p50/p95 of
both, their ratio, and the service's own stage times from /metrics (decode, detect,
encode) for each kind of request. Cases: the shipped tiny detector on 128 px and 512 px
images, and the papers' ResNet-50 FPN detector (600 px input). Results in
bench/results/cache_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.batching import vqa_body
from bench.common import (
    RESULTS,
    ServiceProcess,
    describe_weights,
    latency_stats,
    loadavg,
    machine,
    ratio,
    shapes_scene,
    shipped_detector,
    write_demo_store,
    write_json,
)

STAGES = ("decode", "detect", "encode")


def stage_totals(client: httpx.Client) -> dict[str, tuple[float, float]]:
    """stage -> (seconds, count) so far, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {s: [0.0, 0.0] for s in STAGES}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            stage = s.labels.get("stage")
            if stage in out and s.name == "vqa_stage_seconds_sum":
                out[stage][0] = s.value
            if stage in out and s.name == "vqa_stage_seconds_count":
                out[stage][1] = s.value
    return {k: tuple(v) for k, v in out.items()}


def timed_post(client: httpx.Client, body: bytes, stages: dict) -> float:
    """POST one body; adds this request's stage seconds into `stages`; returns its latency."""
    before = stage_totals(client)
    t0 = time.perf_counter()
    reply = client.post("/v1/vqa", content=body, headers={"content-type": "application/json"})
    seconds = time.perf_counter() - t0
    reply.raise_for_status()
    after = stage_totals(client)
    for stage in STAGES:
        stages.setdefault(stage, []).append(after[stage][0] - before[stage][0])
    return seconds


def run_case(store: Path, ref: str, size: int, n_images: int, later: int) -> dict:
    first, rest = [], []
    first_stages: dict[str, list] = {}
    later_stages: dict[str, list] = {}
    with (
        tempfile.TemporaryDirectory() as data,
        ServiceProcess(store, Path(data), models=[ref]) as s,
    ):
        with httpx.Client(base_url=s.url, timeout=300) as client:
            warm, qs = shapes_scene(10_000, "val", size)  # loads lazily-built parts
            for q in qs[:2]:
                timed_post(client, vqa_body(warm, q, ref), {})
            for i in range(n_images):
                png, questions = shapes_scene(i, "test", size)
                questions = (questions * (later + 1))[: later + 1]
                first.append(timed_post(client, vqa_body(png, questions[0], ref), first_stages))
                for q in questions[1:]:
                    rest.append(timed_post(client, vqa_body(png, q, ref), later_stages))
    first_stats, later_stats = latency_stats(first), latency_stats(rest)
    return {
        "first": first_stats,
        "later": later_stats,
        "first_over_later_p50": ratio(first_stats["p50_ms"], later_stats["p50_ms"]),
        "stages_mean_ms": {
            "first": {k: round(1000 * statistics.mean(v), 2) for k, v in first_stages.items()},
            "later": {k: round(1000 * statistics.mean(v), 2) for k, v in later_stages.items()},
        },
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="lxmert", choices=["lxmert", "vilbert"])
    p.add_argument("--images", type=int, default=30, help="new images, tiny detector")
    p.add_argument("--later", type=int, default=5, help="later questions per image")
    p.add_argument("--resnet-images", type=int, default=8, help="0 skips ResNet-50 FPN")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the service")
    p.add_argument("--random-detector", action="store_true", help="not the trained shapes-detector")
    p.add_argument("--out", type=Path, default=RESULTS / "cache_cpu.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    load_start, t_start = loadavg(), time.time()
    trained = None if args.random_detector else shipped_detector()
    cases = [("tiny", 128, args.images), ("tiny", 512, args.images)]
    if args.resnet_images:
        cases.append(("resnet50_fpn", 128, args.resnet_images))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        stores = {}
        for detector, size, n in cases:
            if detector not in stores:
                root = Path(tmp) / detector / "model_store"
                from_store = trained if detector == "tiny" else None
                refs = write_demo_store(root, (args.model,), detector, trained_detector=from_store)
                stores[detector] = root, refs, describe_weights(from_store, detector)
            root, refs, weights = stores[detector]
            case = run_case(root, refs[args.model], size, n, args.later)
            results.append(
                {"detector": refs["detector"], "image_px": size, "images": n, "weights": weights}
            )
            results[-1].update(case)
            print(json.dumps(results[-1]), flush=True)
    tiny = results[0]["first_over_later_p50"]
    result = {
        "benchmark": "cache",
        "command": " ".join(["python -m bench.cache", *(argv or sys.argv[1:])]),
        "model": f"{args.model}, demo size, random weights (detectors: see each case)",
        "device": "cpu",
        "threads": args.threads,
        "machine": machine(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "wall_s": round(time.time() - t_start, 1),
        "cases": results,
        "target": {
            "later >= 5x faster than first (the demo's detector, 128 px)": tiny,
            "met": (tiny or 0) >= 5,
        },
    }
    write_json(args.out, result)
    print(json.dumps(result["target"]))
    return result


if __name__ == "__main__":
    main()
