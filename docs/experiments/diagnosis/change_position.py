"""Hard-negative pairs of `eval_match` (seed 0, every image of a split) by where the twin's
change sits: in which listed object (0 = the first one named) of a complete caption, for
every kind of twin but relation ones, in scenes of two objects or more. How often
`model.match` ranks the true caption first.

    python docs/experiments/diagnosis/change_position.py MODEL [SPLIT DATA FEATURES]
"""

import sys
from collections import defaultdict

import numpy as np
import torch

from service.store import ModelStore
from service.training.evaluate import draw_match_pairs, load_model, pair_scores
from service.training.examples import PairSource
from service.training.finetune import changed_tokens

split, data, features = (
    sys.argv[2:5] if len(sys.argv) > 4 else ("test", "data/shapes", "data/features")
)
store = ModelStore("model_store")
model, tok = load_model(store, store.resolve(sys.argv[1]))
src = PairSource.load(data, features, split)
pairs = draw_match_pairs(src, None, 0)
with torch.inference_mode():
    s = pair_scores(model, tok, "match", pairs.texts, pairs.regions).numpy()
by_object = defaultdict(list)
for (p, n), kind in zip(pairs.hard, pairs.kinds, strict=True):
    true_ids, twin_ids = tok(pairs.texts[p])["input_ids"], tok(pairs.texts[n])["input_ids"]
    changed = changed_tokens(true_ids, twin_ids)
    listing = pairs.texts[p].split(".")[0]
    if kind == "relation" or not changed or ("," not in listing and " and " not in listing):
        continue  # a relation twin, or a scene of one object
    before = tok.decode(twin_ids[1 : min(changed)])  # the listing up to the change
    by_object[before.count(",") + before.count(" and ")].append(s[p] > s[n])
print("listed object changed | pairs | true ranked above twin")
for k in sorted(by_object):
    print(f"{k} | {len(by_object[k])} | {np.mean(by_object[k]):.3f}")
