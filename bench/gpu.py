"""Raw throughput on one device: both backbones at the demo size and at the papers' full
size, and the detectors, with random weights (timing does not depend on their values).

    .venv/bin/python -m bench.gpu --device cuda --out OUTDIR     (bench/gpu.sh runs this)
    .venv/bin/python -m bench.gpu --device cpu --quick --out DIR (proves it runs; CI-safe)

Backbones (answers per second of `model.answer`, the VQA head):
  demo   `pretrain.default_config` for 256-d tiny-detector regions;
  full   LXMERT 9/5/5 layers, 768 wide, 36 regions of 2048-d (3,129 answers);
         ViLBERT bert_base_6layer_6conect (`ViLBertConfig` defaults), 36 x 2048-d.
Each at several batch sizes, two ways: `forward` (a collated batch already on the
device: the model alone) and `served` (`Worker.encode`: tokenise + collate + copy +
forward + logits back to the CPU, what the service runs per batch). bf16 on CUDA as the
service loads it (`Worker`), float32 on the CPU. Detectors (images per second of
`extract`): ResNet-50 FPN at 600 px (float32 as served, and under bf16 autocast on CUDA)
and the tiny demo detector at 128 px. A `--budget-s` cap skips what does not fit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from bench.common import (
    demo_config,
    detector_config,
    loadavg,
    machine,
    shapes_scene,
    write_json,
)

FULL_ANSWERS = 3129  # the VQA v2 answer vocabulary
REGIONS = 36


def full_config(kind: str) -> dict:
    from dataclasses import asdict

    if kind == "lxmert":
        from service.models.lxmert import LxmertBackboneConfig

        return asdict(LxmertBackboneConfig(num_qa_labels=FULL_ANSWERS))
    from service.models.vilbert import ViLBertConfig

    return asdict(ViLBertConfig(num_answers=FULL_ANSWERS))


def feature_dim(kind: str, config: dict) -> int:
    return config["visual_feat_dim"] if kind == "lxmert" else config["v_feature_size"]


def synthetic_items(n: int, dim: int, seed: int = 0) -> list:
    """n (question, regions) items: shapes-world questions, random 36-region sets."""
    from service.data.collate import RegionSet
    from service.runtime.worker import EncodeItem

    g = torch.Generator().manual_seed(seed)
    questions = [q for i in range(8) for q in shapes_scene(i, "val")[1]]
    items = []
    for i in range(n):
        xy = torch.rand(REGIONS, 2, generator=g) * 0.7
        wh = torch.rand(REGIONS, 2, generator=g) * 0.3 + 0.01
        boxes = torch.cat([xy, xy + wh], 1)
        feats = torch.randn(REGIONS, dim, generator=g).relu()
        items.append(EncodeItem("vqa", questions[i % len(questions)], RegionSet(feats, boxes)))
    return items


def timed(fn, device: torch.device, min_s: float, min_iters: int, warmup: int) -> float:
    """Median seconds of one call of fn, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times, start = [], time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def bench_backbone(kind: str, size: str, args, device, budget: Budget) -> dict:
    from service.data.tokenizer import load_tokenizer
    from service.models.backbone import build_backbone
    from service.runtime.worker import LoadedBackbone, Worker

    config = demo_config(kind, 256) if size == "demo" else full_config(kind)
    torch.manual_seed(0)
    worker = Worker(device.type)
    module = build_backbone(kind, config).to(device, worker.dtype).eval()
    params = sum(p.numel() for p in module.parameters())
    loaded = LoadedBackbone(None, module, load_tokenizer(), [], None)
    items = synthetic_items(max(args.batch_sizes), feature_dim(kind, config))
    row = {"backbone": kind, "size": size, "params_m": round(params / 1e6, 1)}
    row["dtype"] = str(worker.dtype).removeprefix("torch.")
    row["batches"] = []
    for b in args.batch_sizes:
        if budget.left() < 0:
            row["batches"].append({"batch_size": b, "skipped": "time budget"})
            continue
        try:
            fwd, served = time_batch(module, worker, loaded, items[:b], device, args)
        except torch.OutOfMemoryError:
            row["batches"].append({"batch_size": b, "skipped": "out of memory"})
            torch.cuda.empty_cache()
            continue
        row["batches"].append(
            {
                "batch_size": b,
                "forward_answers_per_s": round(b / fwd, 1),
                "forward_ms": round(1000 * fwd, 2),
                "served_answers_per_s": round(b / served, 1),
                "served_ms": round(1000 * served, 2),
            }
        )
        print(json.dumps({"backbone": kind, "size": size, **row["batches"][-1]}), flush=True)
    done = [r for r in row["batches"] if "forward_answers_per_s" in r]
    if done:
        best = max(done, key=lambda r: r["forward_answers_per_s"])
        row["best_forward"] = {k: best[k] for k in ("batch_size", "forward_answers_per_s")}
        row["best_served_answers_per_s"] = max(r["served_answers_per_s"] for r in done)
    worker.close()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def time_batch(module, worker, loaded, items: list, device, args) -> tuple[float, float]:
    """Median seconds of (model.answer on a collated batch, Worker.encode on the items)."""
    from service.data.collate import collate

    texts, regions = [it.text for it in items], [it.regions for it in items]
    batch = collate(texts, regions, loaded.tokenizer).to(device, worker.dtype)
    with torch.inference_mode():
        forward = timed(lambda: module.answer(batch), device, args.min_s, args.iters, args.warmup)
    served = timed(
        lambda: worker.encode(loaded, items), device, args.min_s, args.iters, args.warmup
    )
    return forward, served


def extract_seconds(module, images: list, autocast: bool, device, args) -> float:
    def run():
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast),
        ):
            return module.extract(images)

    return timed(run, device, args.min_s, args.det_iters, 1)


def bench_detector(backbone: str, px: int, args, device, budget: Budget) -> dict:
    from service.models.detector import RegionDetector

    torch.manual_seed(0)
    module = RegionDetector.from_config(detector_config(backbone)).to(device).eval()
    images = [
        _pixels(shapes_scene(i, "val", size=px)[0]).to(device) for i in range(max(args.det_batches))
    ]
    modes = ["float32"] + (["bf16_autocast"] if device.type == "cuda" else [])
    row = {"detector": backbone, "image_px": px, "batches": []}
    for b, mode in itertools.product(args.det_batches, modes):
        if budget.left() < 0:
            row["batches"].append({"batch_size": b, "mode": mode, "skipped": "time budget"})
            continue

        try:
            seconds = extract_seconds(module, images[:b], mode != "float32", device, args)
        except Exception as exc:  # an op without bf16 support: say so, go on
            row["batches"].append({"batch_size": b, "mode": mode, "error": repr(exc)[:200]})
            continue
        row["batches"].append(
            {"batch_size": b, "mode": mode, "images_per_s": round(b / seconds, 2)}
        )
        print(json.dumps({"detector": backbone, **row["batches"][-1]}), flush=True)
    done = [r for r in row["batches"] if "images_per_s" in r]
    if done:
        row["best_images_per_s"] = max(r["images_per_s"] for r in done)
    return row


def _pixels(png: bytes) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny batches, one timed call each")
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_bench.json")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip what starts later")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.det_batches = [2], [1]
        args.min_s, args.iters, args.warmup, args.det_iters = 0.0, 1, 1, 1
    else:
        args.batch_sizes, args.det_batches = [32, 128, 256, 512], [1, 8, 32]
        args.min_s, args.iters, args.warmup, args.det_iters = 1.0, 5, 3, 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU is visible: run with --device cpu --quick")
    device = torch.device(args.device)
    budget = Budget(args.budget_s)
    load_start, t_start = loadavg(), time.time()
    backbones = [
        bench_backbone(kind, size, args, device, budget)
        for size in ("demo", "full")
        for kind in ("lxmert", "vilbert")
    ]
    detectors = [
        bench_detector("resnet50_fpn", 600, args, device, budget),
        bench_detector("tiny", 128, args, device, budget),
    ]
    full_lxmert = next(b for b in backbones if (b["backbone"], b["size"]) == ("lxmert", "full"))
    resnet = detectors[0]
    result = {
        "benchmark": "gpu",
        "command": " ".join(["python -m bench.gpu", *(argv or sys.argv[1:])]),
        "device": machine().get("gpu", "cpu") if device.type == "cuda" else "cpu",
        "weights": "random (timing does not depend on the values)",
        "quick": args.quick,
        "machine": machine(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "wall_s": round(time.time() - t_start, 1),
        "backbones": backbones,
        "detectors": detectors,
        "aims": {
            "LXMERT-base answers/s on cached regions >= 10,000": full_lxmert.get(
                "best_forward", {}
            ).get("forward_answers_per_s"),
            "ResNet-50 FPN images/s at 600 px >= 100": resnet.get("best_images_per_s"),
        },
    }
    out = write_json(args.out / "gpu_bench.json", result)
    print(json.dumps(result["aims"]), f"-> {out}")
    return result


if __name__ == "__main__":
    main()
