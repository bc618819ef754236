"""Hard-negative pairs of `eval_match` (seed 0, every image of a split) by the number of
objects in the scene: how often `model.match` ranks the true complete caption above its
one-change twin, and puts the two on either side of 0, relation twins apart.

    python docs/experiments/word-check/by_objects.py MODEL [SPLIT DATA FEATURES]
"""

import sys
from collections import defaultdict

import numpy as np
import torch

from service.store import ModelStore
from service.training.evaluate import draw_match_pairs, load_model, pair_scores
from service.training.examples import PairSource

split, data, features = (
    sys.argv[2:5] if len(sys.argv) > 4 else ("test", "data/shapes", "data/features")
)
store = ModelStore("model_store")
model, tok = load_model(store, store.resolve(sys.argv[1]))
model.eval()
src = PairSource.load(data, features, split)
pairs = draw_match_pairs(src, None, 0)
with torch.inference_mode():
    s = pair_scores(model, tok, "match", pairs.texts, pairs.regions).numpy()
objects = [len(src.objects(i)) for i in range(len(src)) if src.captions(i)]
image_of = {p: k for k, p in enumerate(pairs.positives)}  # positives come one per image
by = defaultdict(lambda: defaultdict(list))
for (p, n), kind in zip(pairs.hard, pairs.kinds, strict=True):
    group = "relation" if kind == "relation" else "other"
    by[objects[image_of[p]]][group].append((s[p] > s[n], s[p] > 0 > s[n]))
print("objects | relation twins: n, ranking | other twins: n, ranking, accuracy")
for k in sorted(by):
    rel, other = by[k]["relation"], by[k]["other"]
    r = f"{len(rel)}, {np.mean([a for a, _ in rel]):.3f}" if rel else "0, -"
    o = np.array(other, dtype=float)
    print(f"{k} | {r} | {len(other)}, {o[:, 0].mean():.3f}, {o[:, 1].mean():.3f}")
