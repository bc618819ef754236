"""Matching: the alignment head alone against head + the embeddings' cosine.

    python docs/experiments/match_calibration_study.py MODEL DATA_DIR FEATURES_DIR

For each image of the validation and test splits, `eval_match`'s pairs (its first
caption; a random other image's caption; a hard negative, one attribute, count or
relation changed; seed 0). Scores: the head's logit, and a logistic regression on (head
logit, cosine / T) fitted on the validation pairs; thresholds chosen on validation to
maximise the mean of the random- and hard-negative pair accuracies. Prints both splits;
only the test lines are results. Results: docs/experiments/match-calibration.md.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from service.models.backbone import EMBED_TEMPERATURE
from service.store import ModelStore
from service.training.evaluate import _images, embed_images, embed_texts, load_model, pair_scores
from service.training.examples import PairSource
from service.training.negatives import random_negative, sample_hard_negative


def _text(t):
    return t if t is None or isinstance(t, str) else t.text


def pairs(source: PairSource, seed: int = 0) -> list[tuple]:
    """(image, caption, random negative, hard negative), drawn as eval_match draws them."""
    rng = np.random.default_rng(seed)
    images = _images(source, None, source.captions)
    pool = [source.captions(i)[0] for i in images]
    rows = []
    for i in images:
        caption, objects = source.captions(i)[0], source.objects(i)
        rand = random_negative(objects, pool, rng)
        hard = sample_hard_negative(caption, objects, rng)
        rows.append((i, caption, _text(rand), _text(hard)))
    return rows


def scores(model, tokenizer, source, rows) -> tuple[np.ndarray, np.ndarray]:
    """(head logit, cosine) per text, in row order: caption, random, hard."""
    texts, regions = [], []
    for i, *candidates in rows:
        for t in candidates:
            if t is not None:
                texts.append(t)
                regions.append(source.region_set(i))
    head = pair_scores(model, tokenizer, "match", texts, regions).numpy()
    cosine = embed_texts(model, tokenizer, texts) * embed_images(model, tokenizer, regions)
    return head, cosine.sum(-1).numpy()


def pair_accuracy(score: np.ndarray, rows, threshold: float) -> dict[str, float]:
    """A pair is right when the caption scores above the threshold and the negative not."""
    right = {"random": [], "hard": []}
    k = 0
    for _, _, rand, hard in rows:
        positive = score[k] > threshold
        k += 1
        for name, negative in (("random", rand), ("hard", hard)):
            if negative is not None:
                right[name].append(positive and score[k] <= threshold)
                k += 1
    return {name: round(float(np.mean(v)), 4) for name, v in right.items()}


def best_threshold(score: np.ndarray, rows) -> float:
    candidates = np.quantile(score, np.linspace(0.01, 0.99, 197))
    return float(max(candidates, key=lambda t: sum(pair_accuracy(score, rows, t).values())))


def main(model_ref: str, data_dir: str, features_dir: str) -> dict:
    torch.set_num_threads(1)
    store = ModelStore("model_store")
    model, tokenizer = load_model(store, store.resolve(model_ref))
    split = {}
    for name in ("val", "test"):
        source = PairSource.load(data_dir, features_dir, name)
        rows = pairs(source)
        split[name] = (rows, *scores(model, tokenizer, source, rows))
    rows, head, cosine = split["val"]
    labels = np.array([j == 0 for _, *c in rows for j, t in enumerate(c) if t is not None])
    fit = LogisticRegression(C=10.0).fit(np.stack([head, cosine / EMBED_TEMPERATURE], 1), labels)
    (w_head, w_cos), bias = fit.coef_[0], float(fit.intercept_[0])

    def combined(h, c):
        return w_head * h + w_cos * c / EMBED_TEMPERATURE + bias

    thresholds = {
        "head": best_threshold(head, rows),
        "combined": best_threshold(combined(head, cosine), rows),
    }
    out = {"model": model_ref, "fit": {"w_head": w_head, "w_cosine_over_T": w_cos, "bias": bias}}
    out["thresholds"] = thresholds
    for name, (rows, h, c) in split.items():
        out[name] = {
            "head, threshold 0": pair_accuracy(h, rows, 0.0),
            "head, threshold from val": pair_accuracy(h, rows, thresholds["head"]),
            "combined, threshold 0": pair_accuracy(combined(h, c), rows, 0.0),
            "combined, threshold from val": pair_accuracy(
                combined(h, c), rows, thresholds["combined"]
            ),
        }
    print(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    main(*sys.argv[1:4])
