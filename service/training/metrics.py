"""Evaluation metrics as pure functions: lists, arrays or tensors in, plain numbers out.

A metric over no items is None (not 0 and not NaN): "nothing measured" must not read as
a score, and None survives JSON.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import torch
from torch import Tensor


def _mean(hits: Sequence[bool] | np.ndarray) -> float | None:
    return float(np.mean(hits)) if len(hits) else None


def vqa_accuracy(
    pred_answers: Sequence[str],
    gold_answers: Sequence[str],
    families: Sequence[str],
    all_families: Sequence[str] = (),
) -> dict:
    """Exact-match accuracy overall and per question family.

    Returns {"overall", "count", "by_family": {family: accuracy}, "by_family_count"}.
    Families in `all_families` that have no question map to None, so a report shows
    them as unmeasured rather than dropping them.
    """
    if not len(pred_answers) == len(gold_answers) == len(families):
        raise ValueError("pred_answers, gold_answers and families must have equal lengths")
    hits = [p == g for p, g in zip(pred_answers, gold_answers, strict=True)]
    by_family: dict[str, list[bool]] = {f: [] for f in all_families}
    for hit, family in zip(hits, families, strict=True):
        by_family.setdefault(family, []).append(hit)
    return {
        "overall": _mean(hits),
        "count": len(hits),
        "by_family": {f: _mean(h) for f, h in by_family.items()},
        "by_family_count": {f: len(h) for f, h in by_family.items()},
    }


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _relevant(gold) -> set:
    """A query's gold: one item, or a collection of items that are all right answers."""
    if isinstance(gold, str) or not isinstance(gold, Collection):
        return {int(gold) if isinstance(gold, np.integer | Tensor) else gold}
    return {int(g) if isinstance(g, np.integer | Tensor) else g for g in gold}


def gold_ranks(scores, gold: Sequence) -> np.ndarray:
    """1-based rank of each query's best-placed gold item in a (Q, N) score matrix.

    Higher scores rank first. `gold[q]` is a column index, or a collection of indices
    that are all right (e.g. every image the query caption is true of). Ties count
    against the gold: the rank is 1 + the number of other items scoring at least as high,
    so a model that scores everything equal ranks the gold last, not first.
    """
    s = _as_numpy(scores).astype(np.float64)
    if s.ndim != 2 or len(gold) != s.shape[0]:
        raise ValueError(f"scores must be (Q, N) with Q = len(gold); got {s.shape}, {len(gold)}")
    relevant = np.zeros(s.shape, dtype=bool)
    for q, g in enumerate(gold):
        idx = list(_relevant(g))
        if not idx or min(idx) < 0 or max(idx) >= s.shape[1]:
            raise ValueError(f"gold {g!r} of query {q} is not a column of the scores")
        relevant[q, idx] = True
    best = np.where(relevant, s, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    return 1 + ((s >= best) & ~relevant).sum(axis=1)


def recall_at_k(scores_or_ranked, gold: Sequence, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Fraction of queries with a gold item among the top k, for each k: {"R@k": value}.

    `scores_or_ranked` is either a float (Q, N) score matrix (gold = column indices; ties
    as in `gold_ranks`) or, per query, a ranked sequence of item ids, best first (gold =
    ids; a query whose gold ids are all absent from its list misses at every k). Each
    gold is one item or a collection of items that all count as right.
    """
    if _is_score_matrix(scores_or_ranked):
        ranks = gold_ranks(scores_or_ranked, gold)
    else:
        if len(scores_or_ranked) != len(gold):
            raise ValueError(f"{len(scores_or_ranked)} ranked lists for {len(gold)} queries")
        ranks = np.array([_rank_in(r, g) for r, g in zip(scores_or_ranked, gold, strict=True)])
    return {f"R@{k}": _mean(ranks <= k) for k in ks}


def _is_score_matrix(x) -> bool:
    if isinstance(x, Tensor):
        return x.is_floating_point()
    if isinstance(x, np.ndarray):
        return x.dtype.kind == "f"
    return any(isinstance(v, float | np.floating) for row in x[:1] for v in row[:1])


def _rank_in(ranked, gold) -> float:
    relevant = _relevant(gold)
    for position, item in enumerate(ranked, start=1):
        if (int(item) if isinstance(item, np.integer | Tensor) else item) in relevant:
            return position
    return np.inf


def _area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of broadcast box tensors a (..., 4) and b (..., 4)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = _area(a) + _area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def _boxes(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1, 4)


def box_iou(a, b) -> Tensor:
    """IoU of every box in a (N, 4) with every box in b (M, 4): (N, M).

    Boxes are (x1, y1, x2, y2) in one frame (pixels or normalised); a box of zero area
    has IoU 0 with everything, itself included.
    """
    return _iou(_boxes(a)[:, None, :], _boxes(b)[None, :, :])


def paired_iou(a, b) -> Tensor:
    """IoU of a[i] with b[i]: (N,)."""
    a, b = _boxes(a), _boxes(b)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} boxes against {len(b)}")
    return _iou(a, b)


def grounding_accuracy(pred_boxes, gold_boxes, iou: float = 0.5) -> float | None:
    """Fraction of predicted boxes whose IoU with the gold box is at least `iou`."""
    ious = paired_iou(pred_boxes, gold_boxes)
    return _mean((ious >= iou).numpy())


def match_accuracy(pos_scores, neg_scores, threshold: float = 0.0) -> dict:
    """How well match logits (higher = matched) tell true captions from false ones.

    pos_scores[i] and neg_scores[i] are one image with a true and a false caption.
      "accuracy": the pair is right when the positive's logit is above `threshold` and the
                  negative's below it: with logits and threshold 0, P(match) > 0.5 for
                  the true caption and < 0.5 for the false one. The headline number.
      "ranking":  the positive scores strictly above the negative (ties are wrong).
      "binary":   per caption, classified on the right side of the threshold.
    """
    pos, neg = _as_numpy(pos_scores).astype(np.float64), _as_numpy(neg_scores).astype(np.float64)
    if pos.shape != neg.shape or pos.ndim != 1:
        raise ValueError(f"pos and neg must be equal-length vectors: {pos.shape}, {neg.shape}")
    right_pos, right_neg = pos > threshold, neg < threshold
    return {
        "accuracy": _mean(right_pos & right_neg),
        "ranking": _mean(pos > neg),
        "binary": _mean(np.concatenate([right_pos, right_neg])),
        "count": len(pos),
    }
