"""The regions of one image, as a detector hands them to the backbones.

Backbone-agnostic pieces: the `Regions` record, the ViLBERT and LXMERT location
encodings of its boxes, and the bottom-up-attention rule that picks 10 to 36 regions
out of the detector's scored candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms


@dataclass
class Regions:
    """What a detector found in one image; every tensor has one row per region."""

    boxes: Tensor  # (N, 4) x1, y1, x2, y2 in the image's original pixels
    features: Tensor  # (N, D) box-head output pooled from exactly these boxes
    class_probs: Tensor  # (N, C + 1) softmax, column 0 = background
    labels: Tensor  # (N,) long, 1-based: the class the region was kept for (see below)
    attributes: dict[str, Tensor]  # attribute name -> (N, V) softmax
    scores: Tensor  # (N,) class_probs of that class; the argmax unless NMS removed the
    # region from its best class and it was kept only to fill up to min_regions
    image_size: tuple[int, int]  # (H, W) of the original image

    def __len__(self) -> int:
        return self.boxes.shape[0]


def vilbert_location(boxes: Tensor, width: int, height: int) -> Tensor:
    """ViLBERT's 5-d location: (N, 4) pixel boxes -> x1/W, y1/H, x2/W, y2/H, area/(W*H)."""
    scale = boxes.new_tensor([width, height, width, height])
    norm = boxes / scale  # (N, 4)
    area = (norm[:, 2] - norm[:, 0]) * (norm[:, 3] - norm[:, 1])  # (N,)
    return torch.cat([norm, area.unsqueeze(1)], dim=1)


def lxmert_boxes(boxes: Tensor, width: int, height: int) -> Tensor:
    """LXMERT's 4-d box: (N, 4) pixel boxes -> x1/W, y1/H, x2/W, y2/H."""
    return boxes / boxes.new_tensor([width, height, width, height])


def select_regions(
    boxes: Tensor,
    scores: Tensor,
    nms_thresh: float,
    score_thresh: float,
    min_regions: int,
    max_regions: int,
) -> tuple[Tensor, Tensor]:
    """Pick regions among N proposals scored for C foreground classes, as bottom-up did.

    boxes (N, C, 4) is each proposal's box regressed for each class, scores (N, C) its
    class probabilities. Per-class NMS runs first; a proposal that survives it for some
    class takes its best surviving class and score. Survivors at or above
    `score_thresh` are kept, best first, up to `max_regions`; when fewer than
    `min_regions` pass, the best remaining survivors fill up, then (only if NMS left
    too few) the suppressed proposals by their best score. Returns the proposal
    indices (K,) and their 0-based foreground classes (K,), K = clamp(#passing,
    min_regions, max_regions) but never more than N. Ties break by proposal order.
    """
    n, c = scores.shape
    flat_scores = scores.reshape(-1)  # (N*C,) proposal-major
    flat_classes = torch.arange(c, device=scores.device).repeat(n)
    keep = batched_nms(boxes.reshape(-1, 4), flat_scores, flat_classes, nms_thresh)
    survived = torch.zeros(n * c, dtype=torch.bool, device=scores.device)
    survived[keep] = True
    survived = survived.view(n, c)

    surviving_scores = scores.masked_fill(~survived, -1.0)
    best_surviving, best_class = surviving_scores.max(dim=1)  # (N,), (N,)
    any_survived = survived.any(dim=1)
    best_any, best_any_class = scores.max(dim=1)
    conf = torch.where(any_survived, best_surviving, best_any)
    classes = torch.where(any_survived, best_class, best_any_class)

    rank = torch.where(any_survived, conf, conf - 2.0)  # survivors always first
    order = rank.argsort(descending=True, stable=True)
    passing = int((any_survived & (conf >= score_thresh)).sum())
    count = min(max(passing, min_regions), max_regions, n)
    order = order[:count]
    return order, classes[order]
