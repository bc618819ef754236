"""Does the model know what a hard negative changes? Each text of `eval_match`'s pairs is
read into its claims (`service.data.captions.claim_questions`: each group's count, the
listing's total, the relation) and every claim asked of the VQA head; a text's claim
score is its least claim margin (`claim_margins`: the stated answer's logit less the best
other one's). Thresholds are fitted on val, figures reported on SPLIT: pair accuracy as
`eval_match` counts it (the true caption above the threshold, its twin not) and the
ranking (the true caption above its twin), by kind of change, for

- the alignment head alone, and the served logit without claims (the manifest's
  calibration, `claims` left out);
- the claim score alone, at 0 and at a threshold fitted on val;
- min(served - shift, claims - threshold), as `vqa train calibrate` fits it (`fit_claims`);
- the same with count and relation claims thresholded apart (shift, count threshold,
  relation threshold; coordinate ascent from the joint fit).

    python docs/experiments/diagnosis/claim_questions.py MODEL [SPLIT DATA FEATURES STORE]
"""

import sys
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch

from service.data.captions import expand_claim_questions
from service.models.backbone import MatchCalibration, claim_margins, least_per_text
from service.store import ModelStore
from service.training.calibrate import _total, accuracies, fit_claims
from service.training.evaluate import (
    draw_match_pairs,
    load_model,
    match_pair_parts,
    pair_scores,
    served_logits,
)
from service.training.examples import PairSource

split, data, features, root = (
    sys.argv[2:6] if len(sys.argv) > 5 else ("test", "data/shapes", "data/features", "model_store")
)
store = ModelStore(root)
manifest = store.resolve(sys.argv[1])
model, tok = load_model(store, manifest)
base = replace(MatchCalibration.from_dict(manifest.match_calibration), claims=None)


@torch.inference_mode()
def scores(split: str) -> dict:
    """eval_match's pairs on `split` and each text's scores (N,) every way."""
    pairs = draw_match_pairs(PairSource.load(data, features, split))
    questions, expected, owner = expand_claim_questions(pairs.texts, manifest.answers)
    logits = pair_scores(model, tok, "answer", questions, [pairs.regions[i] for i in owner])
    margins = claim_margins(logits, torch.tensor(expected))
    owner, n = torch.tensor(owner), len(pairs.texts)
    relation = torch.tensor([q.startswith("is the ") for q in questions])
    parts, rows = match_pair_parts(model, tok, pairs.texts, pairs.regions, base.by_sentence)
    print(f"{manifest.ref}, {split}: {n} texts, {len(questions)} claims asked", flush=True)
    return {
        "pairs": pairs,
        "head": pair_scores(model, tok, "match", pairs.texts, pairs.regions),
        "served": served_logits(base, parts, rows),
        "claims": least_per_text(margins, owner, n),
        "counts": least_per_text(margins[~relation], owner[~relation], n),
        "relation": least_per_text(margins[relation], owner[relation], n),
    }


def report(name: str, s: dict, score: torch.Tensor) -> None:
    pairs = s["pairs"]
    by_kind = defaultdict(list)
    for pair, kind in zip(pairs.hard, pairs.kinds, strict=True):
        by_kind[kind].append(pair)

    def ranked(which) -> float:
        pos, neg = torch.tensor(which).T
        return 100 * float((score[pos] > score[neg]).float().mean())

    def hard(k: str, which) -> float:
        return 100 * accuracies(score, replace(pairs, hard=which, kinds=[k] * len(which)))["hard"]

    acc = accuracies(score, pairs)
    kinds = ", ".join(f"{k} {hard(k, v):.1f}/{ranked(v):.1f}" for k, v in sorted(by_kind.items()))
    print(
        f"{name}: random {100 * acc['random']:.1f}%, hard {100 * acc['hard']:.1f}% "
        f"(ranked {ranked(pairs.hard):.1f}%), partial {100 * acc['partial']:.1f}%, "
        f"true {100 * float((score[pairs.positives] > 0).float().mean()):.1f}%"
    )
    print(f"  hard by kind, accuracy/ranked: {kinds}", flush=True)


def capped(s: dict, shift: float, t_count: float, t_relation: float) -> torch.Tensor:
    return torch.minimum(
        torch.minimum(s["served"] - shift, s["counts"] - t_count), s["relation"] - t_relation
    )


val, test = scores("val"), scores(split)
grid = np.quantile(val["claims"][torch.isfinite(val["claims"])].numpy(), np.linspace(0, 1, 101))
t = max(grid, key=lambda g: _total(accuracies(val["claims"] - g, val["pairs"])))
shift, joint = fit_claims(val["served"], val["claims"], val["pairs"])
best = [shift, joint, joint]  # coordinate ascent on (shift, count, relation thresholds)
for _ in range(3):
    for k, values in enumerate((val["served"], val["counts"], val["relation"])):
        finite = values[torch.isfinite(values)].numpy()
        for g in np.quantile(finite, np.linspace(0.01, 0.99, 99)):
            trial = [*best[:k], float(g), *best[k + 1 :]]
            if _total(accuracies(capped(val, *trial), val["pairs"])) > _total(
                accuracies(capped(val, *best), val["pairs"])
            ):
                best = trial
print(f"fitted on val: claims alone {t:.2f}; joint shift {shift:.2f}, threshold {joint:.2f}")
print(f"  apart: shift {best[0]:.2f}, counts {best[1]:.2f}, relation {best[2]:.2f}")
report("head alone", test, test["head"])
report("served without claims", test, test["served"])
report("claims alone, threshold 0", test, test["claims"])
report(f"claims alone, threshold {t:.2f}", test, test["claims"] - t)
report("served and claims (fit_claims)", test, capped(test, shift, joint, joint))
report("served and claims, count and relation apart", test, capped(test, *best))
