"""`vqa train calibrate`: fit how the served match logit combines the alignment head
with the dual embeddings' cosine, on validation pairs.

The alignment head alone calls most near-duplicate captions (one colour or relation
changed) a match; the single-modality embeddings tell many of them apart. A logistic
regression on (head logit, cosine / T) over `eval_match`'s pairs of the validation
split, then the decision threshold that maximises the random- plus hard-negative pair
accuracy there (weighted as the caller chooses: `check_weights`), folded into the bias
(`MatchCalibration`). True captions that describe
part of the image ("a blue circle left of a yellow circle") are positives too, and the
share of them called a match counts in that sum: fitted on complete captions alone, the
calibration called only 14-21% of them a match on test (the head alone 92-94%). Kept
only when it beats the head alone on that split; fine-tuning for matching fits it as its
last step. Texts of several sentences may also be checked sentence by sentence
(`MatchCalibration.by_sentence`): kept when that does better on the same pairs; and so
may each caption's claims, asked of the model's VQA head (`MatchCalibration.claims`,
docs/experiments/diagnosis/, section 12).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
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
    least_claim_margins,
    load_model,
    match_pair_parts,
    match_report,
    own_rows,
    served_logits,
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


def accuracies(scores: Tensor, pairs: MatchPairs, threshold: float = 0.0) -> dict:
    """Random- and hard-negative pair accuracy, and the share of true partial captions
    above the threshold (`match_report`)."""
    report = match_report(scores, pairs, threshold)
    return {
        "random": report["random"]["accuracy"],
        "hard": report["hard"]["accuracy"],
        "partial": report["partial_positive_rate"],
    }


# What the fit maximises: `accuracies` summed with these weights (the operating point):
# more weight on "hard" rejects more near-duplicates, on "partial" accepts more true parts.
EQUAL_WEIGHTS = {"random": 1.0, "hard": 1.0, "partial": 1.0}


def check_weights(weights: dict | None) -> dict[str, float]:
    """`EQUAL_WEIGHTS` updated with `weights`: known keys, numbers >= 0, not all 0."""
    if unknown := set(weights or {}) - set(EQUAL_WEIGHTS):
        raise ValueError(
            f"calibration weights: unknown {sorted(unknown)}, known {list(EQUAL_WEIGHTS)}"
        )
    out = {**EQUAL_WEIGHTS, **(weights or {})}
    if not all(isinstance(v, int | float) and v >= 0 for v in out.values()) or not any(
        out.values()
    ):
        raise ValueError(f"calibration weights must be numbers >= 0, not all 0: {out}")
    return {k: float(v) for k, v in out.items()}


def _total(measured: dict, weights: dict[str, float] = EQUAL_WEIGHTS) -> float:
    """What the fit maximises: `accuracies` weighted."""
    return sum(weights[k] * (v or 0.0) for k, v in measured.items())


def best_threshold(scores: Tensor, pairs: MatchPairs, weights: dict = EQUAL_WEIGHTS) -> float:
    """The threshold (among the scores' quantiles) with the best `_total`."""
    candidates = np.quantile(scores.numpy(), np.linspace(0.01, 0.99, 197))
    return float(max(candidates, key=lambda t: _total(accuracies(scores, pairs, t), weights)))


def fit_match_calibration(
    parts: Tensor,
    pairs: MatchPairs,
    owner: Tensor | None = None,
    claims: Tensor | None = None,
    weights: dict[str, float] = EQUAL_WEIGHTS,
) -> tuple[MatchCalibration, dict]:
    """The calibration fitted on `parts` ((C, 2): head logit, cosine, and the text index
    `owner` (C,) of each row, as `match_pair_parts` gives them; owner None: one row per
    text), complete and partial captions the positives, and the accuracies with and
    without it. The logistic is fitted on the texts as they are; where `parts` also hold
    texts' single sentences, checking those too (`MatchCalibration.by_sentence`, with its
    own threshold) is kept when it does better; so is checking claims, given each text's
    least claim margin (N,) (`least_claim_margins`), with the two thresholds fitted
    together (`fit_claims`). Every choice maximises `_total` under `weights`."""
    owner = torch.arange(len(parts)) if owner is None else owner
    whole = parts[own_rows(owner)]
    labels = torch.zeros(len(whole))
    labels[pairs.positives + pairs.partial] = 1.0
    x = torch.stack([whole[:, 0], whole[:, 1] / EMBED_TEMPERATURE], 1)
    (w_head, w_cosine), bias = fit_logistic(x, labels)
    accuracy = {"head": accuracies(whole[:, 0], pairs)}
    candidates = []
    for by_sentence in (False, True) if len(owner) > len(whole) else (False,):
        fitted = MatchCalibration(float(w_head), float(w_cosine), bias, by_sentence)
        threshold = best_threshold(served_logits(fitted, parts, owner), pairs, weights)
        calibration = replace(fitted, bias=bias - threshold)
        measured = accuracies(served_logits(calibration, parts, owner), pairs)
        accuracy["by_sentence" if by_sentence else "whole_text"] = measured
        candidates.append((_total(measured, weights), by_sentence, calibration, measured))
    _, _, calibration, accuracy["calibrated"] = max(candidates, key=lambda c: (c[0], not c[1]))
    if claims is not None and torch.isfinite(claims).any():
        logits = served_logits(calibration, parts, owner)
        shift, threshold = fit_claims(logits, claims, pairs, weights)
        checked = replace(calibration, bias=calibration.bias - shift, claims=threshold)
        accuracy["claims"] = accuracies(served_logits(checked, parts, owner, claims), pairs)
        if _total(accuracy["claims"], weights) > _total(accuracy["calibrated"], weights):
            calibration, accuracy["calibrated"] = checked, accuracy["claims"]
    return calibration, accuracy


def fit_claims(
    logits: Tensor, claims: Tensor, pairs: MatchPairs, weights: dict = EQUAL_WEIGHTS
) -> tuple[float, float]:
    """The shift of the served logits (N,) and the claim threshold that together give the
    best `_total` for min(logits - shift, claims - threshold): each over 41 quantiles."""
    shifts = np.quantile(logits.numpy(), np.linspace(0.01, 0.99, 41))
    finite = claims[torch.isfinite(claims)].numpy()
    thresholds = np.quantile(finite, np.linspace(0.01, 0.99, 41))
    scored = (
        (
            _total(accuracies(torch.minimum(logits - s, claims - t), pairs), weights),
            float(s),
            float(t),
        )
        for s in (0.0, *shifts)
        for t in thresholds
    )
    _, shift, threshold = max(scored)
    return shift, threshold


def calibrate_model(
    model,
    tokenizer,
    source: PairSource,
    split: str,
    seed: int = 0,
    answers: Sequence[str] | None = None,
    weights: dict | None = None,
    **common,
) -> dict | None:
    """The manifest's `match_calibration` for an eval-mode model, fitted on every image
    of `source` (the `split` named); None when it does not beat the head alone there.
    Given the model's `answers`, checking claims with its VQA head is tried too.
    `weights` (`check_weights`) set the operating point; the default weighs all alike."""
    weights = check_weights(weights)
    pairs = draw_match_pairs(source, None, seed)
    if not pairs.random and not pairs.hard:
        return None  # nothing to fit on
    parts, owner = match_pair_parts(
        model, tokenizer, pairs.texts, pairs.regions, by_sentence=True, **common
    )
    claims = None
    if answers:
        claims = least_claim_margins(
            model, tokenizer, answers, pairs.texts, pairs.regions, **common
        )
    calibration, accuracy = fit_match_calibration(parts, pairs, owner, claims, weights)
    if _total(accuracy["calibrated"], weights) <= _total(accuracy["head"], weights):
        return None
    fitted_on = {
        "split": split,
        "images": len(pairs.positives),
        "seed": seed,
        "weights": weights,
        "accuracy": accuracy,
    }
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
    weights: dict | None = None,
) -> Manifest:
    """Fit `model_ref`'s match calibration on `split` and set it in its manifest (None
    when the head alone does better there); returns the updated manifest. `weights`: the
    operating point (`check_weights`)."""
    if split == "test":
        raise ValueError("fit the calibration on a split the test metrics do not come from")
    weights = check_weights(weights)  # a bad one fails before the model loads
    store = ModelStore(store_root)
    manifest = store.resolve(model_ref)
    model, tokenizer = load_model(store, manifest, device)
    source = PairSource.load(data_dir, features_dir, split)
    check_detector(manifest, source)
    calibration = calibrate_model(
        model,
        tokenizer,
        source,
        split,
        seed,
        manifest.answers,
        weights,
        device=device,
        progress=progress,
    )
    return store.update_manifest(manifest, match_calibration=calibration)
