"""What the calibrated match score costs: the alignment head alone, head + the dual
embeddings' cosine (`match_logits` with and without a `MatchCalibration`), and that plus
the claims check (`least_claim_margins`: each caption's claims asked of the VQA head).

    .venv/bin/python -m bench.match_cost [--rounds 20]

A `/v1/match` request scores several texts against one image. Calibrated, the worker
also runs each text through the text embedding and the image, once per request, through
the image embedding (`match_parts`). This times both on each shipped backbone, one image
and `--texts` captions per call, interleaved round by round at 1 torch thread. Without
the repository's model store it uses demo-size random models. Results:
bench/results/match_cost_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from bench.common import RESULTS, SHIPPED_STORE, latency_stats, loadavg, machine, ratio, write_json
from bench.distinct_rows import MODELS, feature_dim, load_backbone, region_sets

# every calibration costs the same; these are shapes-vilbert@3's (match-calibration.md)
CALIBRATION = {"head": 0.79, "cosine": 0.95, "bias": -17.4}


def scene_captions(n: int, seed: int = 0) -> list[str]:
    """n captions of generated scenes, each scene's in the order the data set writes them."""
    from service.data.language import captions
    from service.data.shapes import generate_scene

    rng = np.random.default_rng(seed)
    texts: list[str] = []
    while len(texts) < n:
        texts += captions(generate_scene(rng), rng)
    return texts[:n]


def answer_vocabulary(ref: str) -> list[str]:
    """The answers of a shipped entry; the shapes world's for a random model."""
    from service.data.language import ANSWERS
    from service.store import ModelStore

    return list(ANSWERS) if ref == "random" else ModelStore(SHIPPED_STORE).resolve(ref).answers


def time_scoring(model, tokenizer, answers, texts, image, rounds: int) -> dict:
    """Head alone, calibrated, and calibrated + claims, interleaved (round 0 warms up):
    stats and their ratios."""
    from service.data.collate import collate
    from service.models.backbone import MatchCalibration, match_logits
    from service.training.evaluate import least_claim_margins

    calibration = MatchCalibration.from_dict(CALIBRATION)
    batch = collate(texts, [image] * len(texts), tokenizer)
    ways = {
        "head": lambda: match_logits(model, batch, None),
        "calibrated": lambda: match_logits(model, batch, calibration),
        "claims": lambda: (
            match_logits(model, batch, calibration),
            least_claim_margins(model, tokenizer, answers, texts, [image] * len(texts)),
        ),
    }
    times = {name: [] for name in ways}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for name, score in ways.items():
                start = time.perf_counter()
                score()
                if r:
                    times[name].append(time.perf_counter() - start)
    stats = {name: latency_stats(t) for name, t in times.items()}
    head, calibrated = stats["head"]["p50_ms"], stats["calibrated"]["p50_ms"]
    return {
        **stats,
        "calibrated_over_head": ratio(calibrated, head),
        "claims_over_calibrated": ratio(stats["claims"]["p50_ms"], calibrated),
    }


def main(argv=None) -> dict:
    from service.data.captions import claim_questions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--texts", type=int, default=8, help="captions per call, one image")
    p.add_argument("--backbones", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", default=str(RESULTS / "match_cost_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    texts = scene_captions(args.texts)
    claims = sum(len(claim_questions(t)) for t in texts)
    result = {
        "rounds": args.rounds,
        "texts": args.texts,
        "claims": claims,
        "loadavg_start": loadavg(),
        "cases": {},
    }
    for kind in args.backbones:
        model, tokenizer, ref = load_backbone(kind)
        image = region_sets(1, feature_dim(model))[0]
        timed = time_scoring(model, tokenizer, answer_vocabulary(ref), texts, image, args.rounds)
        case = {"model": ref, **timed}
        result["cases"][kind] = case
        print(
            f"{ref}: {args.texts} texts ({claims} claims) x 1 image, p50 "
            f"{case['head']['p50_ms']} ms head alone, {case['calibrated']['p50_ms']} ms "
            f"calibrated ({case['calibrated_over_head']}x), {case['claims']['p50_ms']} ms with "
            f"claims ({case['claims_over_calibrated']}x calibrated)"
        )
    result.update(loadavg_end=loadavg(), machine=machine())
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
