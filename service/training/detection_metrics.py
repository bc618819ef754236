"""Detector metrics as pure functions: mAP@0.5, recall of objects, attribute accuracy.

Predictions are the `Regions` a detector kept (each with one label and score);
ground truth is one target dict per image in the detector's training format: boxes
(M, 4) pixels, labels (M,) 1-based, attributes {name: (M,) value index, -1 unknown}.
A metric over nothing (no object of a class, no known attribute) is None, not 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from service.models.regions import Regions

IOU = 0.5


def average_precision(scores: Sequence[float], is_tp: Sequence[bool], num_gt: int) -> float | None:
    """VOC all-point AP: area under the precision envelope of the ranked detections."""
    if num_gt == 0:
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.asarray(is_tp, dtype=np.float64)[order]
    if tp.size == 0:
        return 0.0
    cum_tp = np.cumsum(tp)
    recall = np.concatenate([[0.0], cum_tp / num_gt])
    precision = np.concatenate([[1.0], cum_tp / np.arange(1, tp.size + 1)])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * envelope[1:]))


def match_detections(
    boxes: Tensor, scores: Tensor, gt_boxes: Tensor, iou: float = IOU
) -> list[bool]:
    """VOC matching in one image and class: best first, each detection takes the
    ground truth it overlaps most if that reaches `iou` and is still free."""
    hits = [False] * len(boxes)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return hits
    overlaps = box_iou(boxes, gt_boxes)  # (N, M)
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        best_iou, j = overlaps[i].max(0)
        if best_iou >= iou and not taken[j]:
            taken[j] = True
            hits[i] = True
    return hits


def class_ap(
    regions: Sequence[Regions], targets: Sequence[dict], label: int, iou: float = IOU
) -> float | None:
    """AP at `iou` of one class (1-based label) over all images."""
    scores, hits, num_gt = [], [], 0
    for r, t in zip(regions, targets, strict=True):
        mine = r.labels == label
        gt = t["boxes"][t["labels"] == label]
        num_gt += len(gt)
        scores += r.scores[mine].tolist()
        hits += match_detections(r.boxes[mine], r.scores[mine], gt, iou)
    return average_precision(scores, hits, num_gt)


def best_region(region_boxes: Tensor, gt_boxes: Tensor, iou: float = IOU) -> Tensor:
    """(M,) index of the kept region overlapping each object most, -1 below `iou`."""
    if len(region_boxes) == 0 or len(gt_boxes) == 0:
        return torch.full((len(gt_boxes),), -1, dtype=torch.long)
    best_iou, idx = box_iou(gt_boxes, region_boxes).max(1)
    return torch.where(best_iou >= iou, idx, torch.full_like(idx, -1))


def object_recall(regions: Sequence[Regions], targets: Sequence[dict], iou: float = IOU):
    """Share of ground-truth objects that some kept region covers at `iou`, any label."""
    found = [
        best_region(r.boxes, t["boxes"], iou) >= 0 for r, t in zip(regions, targets, strict=True)
    ]
    found = torch.cat(found) if found else torch.zeros(0, dtype=torch.bool)
    return float(found.float().mean()) if len(found) else None


def attribute_accuracy(
    regions: Sequence[Regions], targets: Sequence[dict], name: str, iou: float = IOU
) -> float | None:
    """Over objects with a known value that a region covers at `iou`: how often the
    best-overlapping region's most probable value is right."""
    right = []
    for r, t in zip(regions, targets, strict=True):
        idx = best_region(r.boxes, t["boxes"], iou)
        truth = t["attributes"][name]
        scored = (idx >= 0) & (truth >= 0)
        predicted = r.attributes[name].argmax(1)[idx[scored]]
        right.append(predicted == truth[scored])
    right = torch.cat(right) if right else torch.zeros(0, dtype=torch.bool)
    return float(right.float().mean()) if len(right) else None


def detection_metrics(
    regions: Sequence[Regions],
    targets: Sequence[dict],
    class_names: Sequence[str],
    attribute_names: Sequence[str],
) -> dict[str, float | None]:
    """Flat report: map50, ap50_<class>, recall50, <attribute>_accuracy."""
    aps = {f"ap50_{c}": class_ap(regions, targets, i + 1) for i, c in enumerate(class_names)}
    measured = [v for v in aps.values() if v is not None]
    out: dict[str, float | None] = {"map50": float(np.mean(measured)) if measured else None}
    out.update(aps)
    out["recall50"] = object_recall(regions, targets)
    for name in attribute_names:
        out[f"{name}_accuracy"] = attribute_accuracy(regions, targets, name)
    return out
