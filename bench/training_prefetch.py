"""Batch prefetch in the training loop: steps/s of fine-tuning "all" with and without it.

    .venv/bin/python -m bench.training_prefetch [--steps 40] [--batch-size 32]
        [--hidden 64] [--repeats 2] [--threads 1] [--device cpu]

One process: a ViLBERT of `--hidden` width (one layer per stack, the test suite's tiny
shape otherwise) fine-tuned on "all" (vqa, match, grounding in round robin) over a
synthetic shapes split (`tests.training.pretrain_support`: the real shapes-world records
and tokenizer, region features made from the ground truth, 16-d). Runs with prefetch off
and on alternate `--repeats` times (so that both see the same background load) after a
short warm-up; the best run of each counts. Also timed: `prepare` alone (the batch: rng
draws, tokenising, collate, copy) and, by difference, the step's compute. Without
prefetch a step costs about prepare + compute; with it about max(prepare, compute).
Numbers on a shared CPU are noisy: read the ratio, and the load printed with it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import loadavg, machine
from service.data.tokenizer import load_tokenizer
from service.models.backbone import build_backbone
from service.training.examples import PairSource
from service.training.finetune import make_objectives, make_step_loss
from service.training.loop import TrainConfig, train
from tests.training.pretrain_support import tiny_overrides, write_tiny_split


def model_config(hidden: int) -> dict:
    """tiny_overrides("vilbert") widened to `hidden` in every stream."""
    config = tiny_overrides("vilbert")
    heads = max(2, hidden // 32)
    for prefix in ("", "v_", "bi_"):
        config[f"{prefix}hidden_size"] = hidden
        config[f"{prefix}intermediate_size"] = 4 * hidden
        config[f"{prefix}num_attention_heads"] = heads
    return config


def step_loss(source: PairSource, batch_size: int):
    return make_step_loss(make_objectives("all", source, load_tokenizer()), batch_size)


def time_training(config: dict, loss, args, prefetch: bool, steps: int) -> float:
    """Seconds per step of `steps` steps (the optimizer's and the loop's work included)."""
    torch.manual_seed(0)
    model = build_backbone("vilbert", config)
    cfg = TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        lr=1e-4,
        progress=False,
        device=args.device,
        prefetch=prefetch,
    )
    start = time.perf_counter()
    train(model, loss, cfg)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def time_prepare(loss, args) -> float:
    """Seconds per step of preparing batches alone (the same cycle of objectives)."""
    rng = np.random.default_rng(0)
    device = torch.device(args.device)
    start = time.perf_counter()
    for step in range(args.steps):
        loss.prepare(step, rng, device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir, features_dir = write_tiny_split(Path(tmp), "train", n=args.images)
        source = PairSource.load(data_dir, features_dir, "train")
        loss = step_loss(source, args.batch_size)
        config = model_config(args.hidden)
        time_training(config, loss, args, prefetch=False, steps=3)  # warm-up
        load_before = loadavg()
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.repeats):
            for mode in ("off", "on"):
                runs[mode].append(time_training(config, loss, args, mode == "on", args.steps))
        prepare_s = time_prepare(loss, args)

    off, on = min(runs["off"]), min(runs["on"])
    compute = max(off - prepare_s, 0.0)
    result = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "hidden": args.hidden,
        "device": args.device,
        "steps_per_s_off": round(1 / off, 2),
        "steps_per_s_on": round(1 / on, 2),
        "speedup_on_over_off": round(off / on, 3),
        "prepare_ms": round(1000 * prepare_s, 2),
        "compute_ms_estimate": round(1000 * compute, 2),
        "ideal_speedup": round(off / max(prepare_s, compute), 3) if compute else None,
        "runs_ms": {k: [round(1000 * v, 2) for v in vs] for k, vs in runs.items()},
        "loadavg": [load_before, loadavg()],
        "machine": machine(),
    }
    print(json.dumps(result, indent=2))
    torch.set_num_threads(threads_before)
    return result


if __name__ == "__main__":
    main()
