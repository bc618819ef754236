"""Single-modality layers once per distinct text or image, against once per pair.

    .venv/bin/python -m bench.distinct_rows [--rounds 20]

Batches repeat their inputs: search's second stage scores one caption against the top 50
images, and a VQA request asks several questions about one image. The layers that read
one modality alone (ViLBERT's text layers before its first co-attention layer; LXMERT's
language and object-relationship encoders) run, in eval mode, once per distinct input
of the batch (`once_per_distinct_row`) and are gathered back. This times each shipped
backbone on two batch shapes, "search" (`match`, one caption x 50 images) and
"questions" (`answer`, 8 questions about each of 4 images), with that path on and with
it replaced by the plain one (every row through every layer), interleaved round by round
at 1 torch thread, and checks that both give the same logits. Without the repository's
model store it uses demo-size models with random weights (the timing does not depend on
the values). Results: bench/results/distinct_rows_cpu.json.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from bench.common import (
    RESULTS,
    SHIPPED_STORE,
    demo_config,
    latency_stats,
    loadavg,
    machine,
    ratio,
    write_json,
)

MODELS = {"vilbert": "shapes-vilbert", "lxmert": "shapes-lxmert"}
CAPTIONS = [
    "a large red circle is above a small blue triangle",
    "there are three shapes: a green rectangle, a yellow circle and a purple triangle",
    "a small gray rectangle is to the left of a big orange circle",
]
QUESTIONS = [
    "what color is the circle?",
    "how many shapes are there?",
    "is there a triangle?",
    "what shape is red?",
    "is the rectangle big or small?",
    "is the circle above the triangle?",
    "what size is the blue shape?",
    "how many triangles are there?",
]


def load_backbone(kind: str):
    """(model, tokenizer, what it is) from the repository's store, else demo-size random."""
    from service.data.tokenizer import load_tokenizer
    from service.models.backbone import build_backbone
    from service.store import ModelNotFound, ModelStore
    from service.training.evaluate import load_model

    try:
        store = ModelStore(SHIPPED_STORE)
        manifest = store.resolve(MODELS[kind])
        return (*load_model(store, manifest), manifest.ref)
    except (ModelNotFound, OSError, ValueError) as e:
        print(f"no {MODELS[kind]} in {SHIPPED_STORE} ({e}): demo size, random weights")
        return build_backbone(kind, demo_config(kind, 256)).eval(), load_tokenizer(), "random"


def region_sets(n: int, feature_dim: int, seed: int = 0):
    """n region sets of 10 regions, as the shapes detector keeps."""
    from service.data.collate import RegionSet

    g = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(n):
        xy = torch.rand(10, 2, generator=g) * 0.6
        boxes = torch.cat([xy, xy + 0.1 + torch.rand(10, 2, generator=g) * 0.3], -1)
        sets.append(RegionSet(torch.randn(10, feature_dim, generator=g), boxes))
    return sets


def feature_dim(model) -> int:
    """The region feature size a backbone reads."""
    return getattr(model.config, "v_feature_size", None) or model.config.visual_feat_dim


def batches(tokenizer, feature_dim: int, rerank: int, images: int) -> dict[str, tuple]:
    """{shape: (method, [Batch])}: the two batch shapes the service sends most."""
    from service.data.collate import collate

    search = region_sets(rerank, feature_dim)
    scenes = region_sets(images, feature_dim, seed=1)
    asked = [r for r in scenes for _ in QUESTIONS]
    return {
        "search": ("match", [collate([c] * rerank, search, tokenizer) for c in CAPTIONS]),
        "questions": ("answer", [collate(QUESTIONS * images, asked, tokenizer)]),
    }


def _every_row(fn, *inputs):
    return fn(*inputs)


def time_paths(kind: str, model, method: str, shape_batches: list, rounds: int) -> dict:
    """Both paths interleaved round by round (round 0 warms up): stats and logit gap."""
    module = importlib.import_module(f"service.models.{kind}")
    paths = {"once_per_distinct": module.once_per_distinct_row, "every_row": _every_row}
    times = {name: [] for name in paths}
    logits = {name: [] for name in paths}
    try:
        with torch.inference_mode():
            for r in range(rounds + 1):
                for name, path in paths.items():
                    module.once_per_distinct_row = path
                    for batch in shape_batches:
                        start = time.perf_counter()
                        out = getattr(model, method)(batch)
                        if r:
                            times[name].append(time.perf_counter() - start)
                        logits[name].append(out)
    finally:
        module.once_per_distinct_row = paths["once_per_distinct"]
    gap = max(
        (a - b).abs().max().item()
        for a, b in zip(logits["once_per_distinct"], logits["every_row"], strict=True)
    )
    stats = {name: latency_stats(t) for name, t in times.items()}
    speedup = ratio(stats["every_row"]["p50_ms"], stats["once_per_distinct"]["p50_ms"])
    return {**stats, "every_row_over_once": speedup, "max_abs_logit_difference": gap}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--rerank", type=int, default=50, help="images per search call")
    p.add_argument("--images", type=int, default=4, help="images per questions call")
    p.add_argument("--backbones", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", default=str(RESULTS / "distinct_rows_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {"rounds": args.rounds, "loadavg_start": loadavg(), "models": {}, "cases": {}}
    for kind in args.backbones:
        model, tokenizer, ref = load_backbone(kind)
        result["models"][kind] = ref
        shapes = batches(tokenizer, feature_dim(model), args.rerank, args.images)
        for shape, (method, shape_batches) in shapes.items():
            case = time_paths(kind, model, method, shape_batches, args.rounds)
            case["items_per_call"] = len(shape_batches[0])
            result["cases"][f"{kind}/{shape}"] = case
            print(
                f"{ref} {shape} ({case['items_per_call']} items, {method}): p50 "
                f"{case['once_per_distinct']['p50_ms']} ms once per distinct input, "
                f"{case['every_row']['p50_ms']} ms every row "
                f"({case['every_row_over_once']}x); max |logit diff| "
                f"{case['max_abs_logit_difference']:.1e}"
            )
    result.update(loadavg_end=loadavg(), machine=machine())
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
