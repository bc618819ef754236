"""/v1/match's score three ways, on the test pairs of `eval_match` (seed 0): the alignment
head alone; calibrated on the whole text (`vqa train calibrate` before by-sentence
checks); and the calibration `vqa train calibrate` fits now, which may also check each
sentence of a text alone. Both calibrations are fitted on the validation split.

    python docs/experiments/match-by-sentence/compare.py MODEL [STORE DATA FEATURES]
"""

import sys

import torch

from service.store import ModelStore
from service.training.calibrate import accuracies, fit_match_calibration
from service.training.evaluate import (
    draw_match_pairs,
    load_model,
    match_pair_parts,
    match_report,
    own_rows,
    served_logits,
)
from service.training.examples import PairSource

store_root, data, features = (
    sys.argv[2:5] if len(sys.argv) > 4 else ("model_store", "data/shapes", "data/features")
)
store = ModelStore(store_root)
model, tok = load_model(store, store.resolve(sys.argv[1]))


def parts(split: str):
    pairs = draw_match_pairs(PairSource.load(data, features, split), None, 0)
    with torch.inference_mode():
        p, owner = match_pair_parts(model, tok, pairs.texts, pairs.regions, by_sentence=True)
    return pairs, p, owner


val, test = parts("val"), parts("test")
whole, _ = fit_match_calibration(val[1][own_rows(val[2])], val[0])
fitted, _ = fit_match_calibration(val[1], val[0], val[2])
pairs, p, owner = test
rows = {
    "head alone": p[own_rows(owner), 0],
    "calibrated, whole text": served_logits(whole, p, owner),
    f"calibrated, by_sentence={fitted.by_sentence}": served_logits(fitted, p, owner),
}
print(f"{sys.argv[1]}: test pairs, {len(pairs.positives)} images")
print("| score | random | hard | true partial captions | hard by kind |")
print("|---|---:|---:|---:|---|")
for name, scores in rows.items():
    a = accuracies(scores, pairs)
    kinds = match_report(scores, pairs)["hard"]["by_kind"]
    by_kind = ", ".join(f"{k} {100 * v:.1f}" for k, v in kinds.items())
    print(
        f"| {name} | {100 * a['random']:.1f}% | {100 * a['hard']:.1f}% "
        f"| {100 * a['partial']:.1f}% | {by_kind} |"
    )
