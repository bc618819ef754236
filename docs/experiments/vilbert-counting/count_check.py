"""Count questions, top answer, on train (first 600 images), val and test; then the count
answers' logits shifted by -alpha * count, alpha fitted on val, on test.

    python docs/experiments/vilbert-counting/count_check.py MODEL [STORE DATA FEATURES]
"""

import sys

import numpy as np
import torch

from service.store import ModelStore
from service.training.evaluate import load_model, pair_scores
from service.training.examples import PairSource

ref = sys.argv[1]
root, data, features = (
    sys.argv[2:5] + ["model_store", "data/shapes", "data/features"][len(sys.argv) - 2 :]
)[:3]
store = ModelStore(root)
manifest = store.resolve(ref)
model, tok = load_model(store, manifest)
counts = [manifest.answers.index(str(k)) for k in range(7)]


def count_logits(split: str, images: int | None = None):
    source = PairSource.load(data, features, split)
    texts, regions, gold = [], [], []
    for i in range(images or len(source)):
        for q in source.questions(i):
            if q["family"] == "count":
                texts.append(q["question"])
                regions.append(source.region_set(i))
                gold.append(manifest.answers.index(q["answer"]))
    with torch.inference_mode():
        return pair_scores(model, tok, "answer", texts, regions).float(), torch.tensor(gold)


def accuracy(logits, gold, alpha: float = 0.0) -> float:
    shifted = logits.clone()
    shifted[:, counts] -= alpha * torch.arange(7.0)
    return 100 * float((shifted.argmax(1) == gold).float().mean())


splits = {
    "train": count_logits("train", 600),
    "val": count_logits("val"),
    "test": count_logits("test"),
}
for name, (logits, gold) in splits.items():
    print(f"{ref} {name}: {len(gold)} count questions, {accuracy(logits, gold):.1f}%")
alpha = max(np.arange(0, 2.01, 0.05), key=lambda a: accuracy(*splits["val"], a))
print(f"bias -{alpha:.2f} x count (best on val): test {accuracy(*splits['test'], alpha):.1f}%")
