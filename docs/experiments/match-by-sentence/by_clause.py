"""Tried and dropped: checking each listed object alone too. Every sentence of a text is
also split into its noun phrases when it is a list of them ("a large blue circle, a small
yellow circle and a large black circle" -> three claims; only when every piece starts with
an article or a number word), and the text's logit is the least over all its claims. The
calibration is refitted on val both ways, as `vqa train calibrate` does, and the test
pairs of `eval_match` (seed 0) are scored with each.

    python docs/experiments/match-by-sentence/by_clause.py MODEL [STORE DATA FEATURES]
"""

import re
import sys
from dataclasses import replace

import torch

import service.models.backbone as backbone
from service.store import ModelStore
from service.training.calibrate import accuracies, best_threshold, fit_match_calibration
from service.training.evaluate import (
    draw_match_pairs,
    load_model,
    match_pair_parts,
    match_report,
    served_logits,
)
from service.training.examples import PairSource

STARTS = {"a", "an", "the", "one", "two", "three", "four", "five", "six", "seven", "eight"}
LIST_SEPARATOR = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")
by_sentence = backbone.match_claims


def by_clause(text: str) -> list[str]:
    claims = by_sentence(text)
    for sentence in claims[1:] or claims:
        pieces = [p.strip() for p in LIST_SEPARATOR.split(sentence) if p.strip()]
        if len(pieces) > 1 and all(p.split()[0] in STARTS for p in pieces):
            claims = claims + pieces
    return claims


store_root, data, features = (
    sys.argv[2:5] if len(sys.argv) > 4 else ("model_store", "data/shapes", "data/features")
)
store = ModelStore(store_root)
model, tok = load_model(store, store.resolve(sys.argv[1]))
print("| claims | kept by the fit | random | hard | true partial captions |")
print("|---|---|---:|---:|---:|")
for name, claims in (("sentences", by_sentence), ("sentences and listed objects", by_clause)):
    backbone.match_claims = claims
    scored = {}
    for split in ("val", "test"):
        pairs = draw_match_pairs(PairSource.load(data, features, split), None, 0)
        with torch.inference_mode():
            scored[split] = (pairs, *match_pair_parts(model, tok, pairs.texts, pairs.regions, True))
    fitted, _ = fit_match_calibration(scored["val"][1], scored["val"][0], scored["val"][2])
    forced = replace(fitted, by_sentence=True)  # the least over the claims, kept or not
    val_scores = served_logits(forced, *scored["val"][1:])
    forced = replace(forced, bias=forced.bias - best_threshold(val_scores, scored["val"][0]))
    pairs, parts, owner = scored["test"]
    scores = served_logits(forced, parts, owner)
    a = accuracies(scores, pairs)
    print(
        f"| {name} (least over them) | {fitted.by_sentence} | {100 * a['random']:.1f}% "
        f"| {100 * a['hard']:.1f}% | {100 * a['partial']:.1f}% |"
    )
    kinds = match_report(scores, pairs)["hard"]["by_kind"]
    print("|", ", ".join(f"{k} {100 * v:.1f}" for k, v in kinds.items()), "| | | | |")
