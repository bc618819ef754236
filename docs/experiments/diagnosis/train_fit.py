"""Is the alignment head's hard-negative miss a failure to generalise, or to fit?
`eval_match`'s pairs (seed 0, the alignment head alone) on the first 1,000 images of the
train split, which fine-tuning drew its pairs from, and of the test split.

    python docs/experiments/diagnosis/train_fit.py MODEL [DATA FEATURES]
"""

import sys

import torch

from service.store import ModelStore
from service.training.evaluate import eval_match, load_model
from service.training.examples import PairSource

data, features = sys.argv[2:4] if len(sys.argv) > 3 else ("data/shapes", "data/features")
store = ModelStore("model_store")
model, tok = load_model(store, store.resolve(sys.argv[1]))
print("split | random | hard | hard, ranked | hard by kind")
for split in ("train", "test"):
    with torch.inference_mode():
        r = eval_match(model, tok, PairSource.load(data, features, split), max_images=1000)
    kinds = ", ".join(f"{k} {100 * v:.1f}" for k, v in r["hard"]["by_kind"].items())
    print(
        f"{split} | {100 * r['random']['accuracy']:.1f} | {100 * r['hard']['accuracy']:.1f} "
        f"| {100 * r['hard']['ranking']:.1f} | {kinds}"
    )
