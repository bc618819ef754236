"""Detector throughput on this CPU: images per second of `extract` at batch 1 and 16.

    .venv/bin/python bench/detector.py [--model shapes-detector] [--store model_store]
        [--data /work/data/shapes] [--resnet] [--threads 1 2]
        [--out bench/results/detector_cpu.json]

The tiny detector reads 128 px shapes-world test images (the stored model when
--model names one, else random weights of the default config: the same work per
image, give or take the regions kept). --resnet adds torchvision's ResNet-50 FPN
(random weights, nothing downloaded) at batch 1 on a 600 x 600 image. Each setting
runs `--warmup` untimed calls, then `--repeats` timed ones; the median is reported,
for each torch thread count in --threads.
Not a test: numbers depend on the machine and on what else runs there, so the JSON
records the CPU, the torch threads and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from service.data.records import load_records
from service.data.shapes import generate_scene, render, split_rng
from service.models.detector import DetectorConfig, RegionDetector
from service.training.detector import record_image


def shapes_images(data_dir: str | None, n: int) -> list[torch.Tensor]:
    """n shapes-world test images: from data_dir when given, else generated (same seeds)."""
    if data_dir and (Path(data_dir) / "test.jsonl").exists():
        records = load_records(data_dir, "test")[:n]
        return [record_image(data_dir, r) for r in records]
    scenes = [render(generate_scene(split_rng(0, "test", i))) for i in range(n)]
    return [torch.from_numpy(np.asarray(s)).permute(2, 0, 1) / 255.0 for s in scenes]


def tiny_detector(model: str | None, store: str) -> tuple[RegionDetector, str]:
    if model:
        from service.training.detector_ops import load_detector

        detector, manifest = load_detector(store, model)
        return detector, manifest.ref
    torch.manual_seed(0)
    return RegionDetector.from_config(DetectorConfig()).eval(), "tiny (random weights)"


def time_extract(
    model: RegionDetector, images: list[torch.Tensor], batch: int, warmup: int, repeats: int
) -> dict:
    """Median seconds of one extract call on `batch` images, and images per second."""
    calls = [images[(i * batch) % len(images) :][:batch] for i in range(warmup + repeats)]
    calls = [c if len(c) == batch else images[:batch] for c in calls]
    seconds, regions = [], []
    for i, chunk in enumerate(calls):
        start = time.perf_counter()
        found = model.extract(chunk)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
            regions += [len(r) for r in found]
    median = statistics.median(seconds)
    return {
        "batch": batch,
        "image_px": list(images[0].shape[-2:]),
        "median_s_per_call": round(median, 4),
        "images_per_s": round(batch / median, 1),
        "ms_per_image": round(1000 * median / batch, 2),
        "repeats": repeats,
        "mean_regions": round(statistics.mean(regions), 1),
    }


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="stored detector (default: random tiny)")
    p.add_argument("--store", default="model_store")
    p.add_argument("--data", default=None, help="shapes data folder with test.jsonl")
    p.add_argument("--resnet", action="store_true", help="also ResNet-50 FPN at 600 px, batch 1")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--out", default="bench/results/detector_cpu.json")
    args = p.parse_args()

    load_before = os.getloadavg()
    facts = machine()  # before --threads changes the count
    model, name = tiny_detector(args.model, args.store)
    images = shapes_images(args.data, 64)
    big = None
    if args.resnet:
        torch.manual_seed(0)
        big = RegionDetector.from_config(DetectorConfig(backbone="resnet50_fpn")).eval()
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in (1, 16):
            r = time_extract(model, images, batch, args.warmup, args.repeats)
            results.append({"model": name, "threads": threads, **r})
        if big is not None:
            r = time_extract(big, [torch.rand(3, 600, 600)], 1, 1, max(3, args.repeats // 4))
            results.append({"model": "resnet50_fpn (random weights)", "threads": threads, **r})
    report = {
        "command": "python bench/detector.py " + " ".join(sys.argv[1:]),
        "machine": facts,
        "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
