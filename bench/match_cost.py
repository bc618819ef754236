"""What the calibrated match score costs: the alignment head alone against head + the
dual embeddings' cosine (`match_logits` with and without a `MatchCalibration`).

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

import torch

from bench.common import RESULTS, latency_stats, loadavg, machine, ratio, write_json
from bench.distinct_rows import CAPTIONS, MODELS, feature_dim, load_backbone, region_sets

# every calibration costs the same; these are shapes-vilbert@3's (match-calibration.md)
CALIBRATION = {"head": 0.79, "cosine": 0.95, "bias": -17.4}


def time_scoring(model, batch, rounds: int) -> dict:
    """Head alone and calibrated, interleaved (round 0 warms up): stats and their ratio."""
    from service.models.backbone import MatchCalibration, match_logits

    ways = {"head": None, "calibrated": MatchCalibration.from_dict(CALIBRATION)}
    times = {name: [] for name in ways}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for name, calibration in ways.items():
                start = time.perf_counter()
                match_logits(model, batch, calibration)
                if r:
                    times[name].append(time.perf_counter() - start)
    stats = {name: latency_stats(t) for name, t in times.items()}
    return {
        **stats,
        "calibrated_over_head": ratio(stats["calibrated"]["p50_ms"], stats["head"]["p50_ms"]),
    }


def main(argv=None) -> dict:
    from service.data.collate import collate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--texts", type=int, default=8, help="captions per call, one image")
    p.add_argument("--backbones", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", default=str(RESULTS / "match_cost_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {"rounds": args.rounds, "texts": args.texts, "loadavg_start": loadavg(), "cases": {}}
    for kind in args.backbones:
        model, tokenizer, ref = load_backbone(kind)
        texts = [CAPTIONS[i % len(CAPTIONS)] + f" ({i})" for i in range(args.texts)]
        image = region_sets(1, feature_dim(model))[0]
        batch = collate(texts, [image] * len(texts), tokenizer)
        case = {"model": ref, **time_scoring(model, batch, args.rounds)}
        result["cases"][kind] = case
        print(
            f"{ref}: {args.texts} texts x 1 image, p50 {case['head']['p50_ms']} ms head alone, "
            f"{case['calibrated']['p50_ms']} ms calibrated ({case['calibrated_over_head']}x)"
        )
    result.update(loadavg_end=loadavg(), machine=machine())
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
