"""Head alone, word check alone, combined (`model.match`, no calibration): `eval_match`'s
pairs (seed 0) on the first N images of a split, for a store entry with a word check.

    python docs/experiments/word-check/diag.py MODEL N SPLIT [DATA FEATURES [STORE]]
"""

import sys

import torch

from service.models.backbone import word_checked
from service.store import ModelStore
from service.training.evaluate import draw_match_pairs, load_model, match_report, pair_scores
from service.training.examples import PairSource

torch.set_num_threads(1)
ref, n = sys.argv[1], int(sys.argv[2])
DATA, FEATURES = (
    (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else ("data/shapes", "data/features")
)
store = ModelStore(sys.argv[6] if len(sys.argv) > 6 else "model_store")
model, tok = load_model(store, store.resolve(ref))
model.eval()
src = PairSource.load(DATA, FEATURES, sys.argv[3])
pairs = draw_match_pairs(src, n, 0)


def parts(b):
    h, w = model.match_words(b)
    return torch.stack(
        [
            h,
            -w.masked_fill(b.attention_mask == 0, -1e4).max(1).values,
            word_checked(h, w, b.attention_mask),
        ],
        -1,
    )


with torch.inference_mode():
    s = pair_scores(model, tok, parts, pairs.texts, pairs.regions)
for i, name in enumerate(["head", "words", "combined"]):
    r = match_report(s[:, i], pairs)
    print(
        name,
        "random",
        r["random"]["accuracy"],
        "hard",
        r["hard"]["accuracy"],
        "rank",
        round(r["hard"]["ranking"], 3),
        "pos",
        r["positive_rate"],
        "partial",
        round(r["partial_positive_rate"], 3),
        {k: round(v, 2) for k, v in r["hard"]["ranking_by_kind"].items()},
    )
