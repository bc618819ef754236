"""`vqa train calibrate`: fit how the served match logit combines the alignment head
with the dual embeddings' cosine, on validation pairs.

The alignment head alone calls most near-duplicate captions (one colour or relation
changed) a match; the single-modality embeddings tell many of them apart. A logistic
regression on (head logit, cosine / T) over `eval_match`'s pairs of the validation
split, then the decision threshold that maximises the random- plus hard-negative pair
accuracy there, folded into the bias (`MatchCalibration`). True captions that describe
part of the image ("a blue circle left of a yellow circle") are positives too, and the
share of them called a match counts in that sum: fitted on complete captions alone, the
cosine term rejected 58-95% of them. Kept only when it beats the head alone on that
split; fine-tuning for matching fits it as its last step.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from service.models.backbone import EMBED_TEMPERATURE, MatchCalibration
from service.store import Manifest, ModelStore
from service.training.evaluate import (
    MatchPairs,
    check_detector,
    draw_match_pairs,
    load_model,
    match_pair_parts,
    match_report,
)
from service.training.examples import PairSource


def fit_logistic(x: Tensor, y: Tensor, l2: float = 1e-4) -> tuple[Tensor, float]:
    """Weights (D,) and bias of a logistic regression of labels y (N,) on x (N, D)."""
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-12)
    z = (x - mean) / std  # standardised: LBFGS converges in a few steps
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y)
        value = value + l2 * (w**2).sum()
        value.backward()
        return value

    opt.step(loss)
    weights = (w / std).detach()
    return weights, float(b.detach() - (weights * mean).sum())


def accuracies(scores: Tensor, pairs: MatchPairs, partial: Tensor, threshold: float = 0.0):
    """Random- and hard-negative pair accuracy, and the share of true partial captions
    (`partial_captions`; their scores) above the threshold."""
    report = match_report(scores, pairs, threshold)
    out = {k: report[k]["accuracy"] for k in ("random", "hard")}
    out["partial"] = float((partial > threshold).float().mean()) if len(partial) else None
    return out


def _total(measured: dict) -> float:
    """What the fit maximises: the sum of `accuracies`."""
    return sum(v or 0.0 for v in measured.values())


def best_threshold(scores: Tensor, pairs: MatchPairs, partial: Tensor) -> float:
    """The threshold (among the scores' quantiles) with the best `_total`."""
    candidates = np.quantile(torch.cat([scores, partial]).numpy(), np.linspace(0.01, 0.99, 197))
    return float(max(candidates, key=lambda t: _total(accuracies(scores, pairs, partial, t))))


def partial_captions(source: PairSource, seed: int = 0) -> MatchPairs:
    """One true caption other than the complete one per image ("a blue circle left of a
    yellow circle"): the fit must keep calling these matches, as the head does."""
    rng = np.random.default_rng(seed)
    pairs = MatchPairs()
    for i in range(len(source)):
        others = source.captions(i)[1:]
        if others:
            pairs.add(others[int(rng.integers(len(others)))], source.region_set(i))
    return pairs


def fit_match_calibration(
    parts: Tensor, pairs: MatchPairs, partial: Tensor
) -> tuple[MatchCalibration, dict]:
    """The calibration fitted on `parts` ((N, 2): head logit, cosine, `match_pair_parts`)
    and on the partial captions' (M, 2) `partial`, and the accuracies with and without it."""
    labels = torch.zeros(len(parts))
    labels[pairs.positives] = 1.0
    x = torch.cat([parts, partial])  # (N + M, 2)
    y = torch.cat([labels, torch.ones(len(partial))])
    (w_head, w_cosine), bias = fit_logistic(
        torch.stack([x[:, 0], x[:, 1] / EMBED_TEMPERATURE], 1), y
    )
    fitted = MatchCalibration(float(w_head), float(w_cosine), bias)

    def logit(p: Tensor) -> Tensor:
        return fitted.logit(p[:, 0], p[:, 1])

    threshold = best_threshold(logit(parts), pairs, logit(partial))
    calibration = MatchCalibration(fitted.head, fitted.cosine, bias - threshold)
    accuracy = {
        "head": accuracies(parts[:, 0], pairs, partial[:, 0]),
        "calibrated": accuracies(
            calibration.logit(parts[:, 0], parts[:, 1]),
            pairs,
            calibration.logit(partial[:, 0], partial[:, 1]),
        ),
    }
    return calibration, accuracy


def calibrate_model(
    model, tokenizer, source: PairSource, split: str, seed: int = 0, **common
) -> dict | None:
    """The manifest's `match_calibration` for an eval-mode model, fitted on every image
    of `source` (the `split` named); None when it does not beat the head alone there."""
    pairs = draw_match_pairs(source, None, seed)
    if not pairs.random and not pairs.hard:
        return None  # nothing to fit on
    parts = match_pair_parts(model, tokenizer, pairs, **common)
    others = partial_captions(source, seed)
    if others.texts:
        partial = match_pair_parts(model, tokenizer, others, **common)
    else:
        partial = parts.new_zeros((0, 2))
    calibration, accuracy = fit_match_calibration(parts, pairs, partial)
    if _total(accuracy["calibrated"]) <= _total(accuracy["head"]):
        return None
    fitted_on = {"split": split, "images": len(pairs.positives), "seed": seed, "accuracy": accuracy}
    return {**asdict(calibration), "fitted_on": fitted_on}


def run_calibrate(
    model_ref: str,
    store_root: str | Path,
    features_dir: str | Path,
    data_dir: str | Path,
    split: str = "val",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> Manifest:
    """Fit `model_ref`'s match calibration on `split` and set it in its manifest (None
    when the head alone does better there); returns the updated manifest."""
    if split == "test":
        raise ValueError("fit the calibration on a split the test metrics do not come from")
    store = ModelStore(store_root)
    manifest = store.resolve(model_ref)
    model, tokenizer = load_model(store, manifest, device)
    source = PairSource.load(data_dir, features_dir, split)
    check_detector(manifest, source)
    calibration = calibrate_model(
        model, tokenizer, source, split, seed, device=device, progress=progress
    )
    return store.update_manifest(manifest, match_calibration=calibration)
