"""Does a region's vector still say where the region is? A linear (ridge) probe from each
region's vector to its box centre (x, y in [0, 1]), fit on the regions of 1,000 train
images, judged on 400 test images (R^2), at three depths: the visual embedding (feature +
box), after the visual layers alone, and after the cross-modal layers (read with the
image's complete caption). Also ViLBERT's and LXMERT's relation questions by axis.

    python docs/experiments/diagnosis/location_probe.py MODEL [DATA FEATURES]
"""

import sys
from collections import defaultdict

import numpy as np
import torch

from service.data.collate import collate
from service.models.vilbert import with_img_token
from service.store import ModelStore
from service.training.evaluate import load_model, pair_scores
from service.training.examples import PairSource

data, features = sys.argv[2:4] if len(sys.argv) > 3 else ("data/shapes", "data/features")
store = ModelStore("model_store")
manifest = store.resolve(sys.argv[1])
model, tok = load_model(store, manifest)


def depths(batch) -> dict:
    """Region vectors (B, R, H) at each depth."""
    image = (batch.region_features, batch.region_boxes, batch.region_mask)
    if model.kind == "vilbert":
        feats, locs, _ = with_img_token(*image)
        return {
            "embedding": model.image_embeddings(feats, locs)[:, 1:],
            "visual layers": model.image_stream(*image)[:, 1:],
            "cross-modal": model.encode(batch)["sequence_output_v"][:, 1:],
        }
    return {
        "embedding": model.lxmert.encoder.visn_fc(batch.region_features, batch.region_boxes),
        "visual layers": model.encode_image(*image),
        "cross-modal": model.encode(batch)[1],
    }


def regions(split: str, n: int) -> tuple[dict, np.ndarray]:
    src = PairSource.load(data, features, split)
    vectors, centres = defaultdict(list), []
    for start in range(0, n, 50):
        idx = range(start, min(n, start + 50))
        batch = collate([src.captions(i)[0] for i in idx], [src.region_set(i) for i in idx], tok)
        with torch.inference_mode():
            out = depths(batch)
        real = batch.region_mask.bool()
        for name, v in out.items():
            vectors[name].append(v[real].float().numpy())
        b = batch.region_boxes[real].numpy()
        centres.append(np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1))
    return {k: np.concatenate(v) for k, v in vectors.items()}, np.concatenate(centres)


def with_bias(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1))])


train, train_y = regions("train", 1000)
test, test_y = regions("test", 400)
print("depth | x R^2 | y R^2")
for name in train:
    x = with_bias(train[name])
    w = np.linalg.solve(x.T @ x + np.eye(x.shape[1]), x.T @ train_y)
    err = ((with_bias(test[name]) @ w - test_y) ** 2).sum(0)
    r2 = 1 - err / ((test_y - test_y.mean(0)) ** 2).sum(0)
    print(f"{name} | {r2[0]:.3f} | {r2[1]:.3f}")

src = PairSource.load(data, features, "test")
questions = [
    (q["question"], q["answer"], src.region_set(i))
    for i in range(len(src))
    for q in src.questions(i)
    if q["family"] == "relation"
]
with torch.inference_mode():
    logits = pair_scores(
        model, tok, "answer", [q for q, _, _ in questions], [r for *_, r in questions]
    )
by_axis = defaultdict(list)
for (q, answer, _), row in zip(questions, logits, strict=True):
    axis = "left/right" if " left of " in q or " right of " in q else "above/below"
    asks = "yes/no" if answer in ("yes", "no") else "other"
    by_axis[(axis, asks)].append(manifest.answers[int(row.argmax())] == answer)
print("relation questions | count | accuracy")
for key, ok in sorted(by_axis.items()):
    print(f"{' '.join(key)} | {len(ok)} | {np.mean(ok):.3f}")
