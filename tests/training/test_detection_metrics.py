"""Detector metrics on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import pytest
import torch

from service.models.regions import Regions
from service.training.detection_metrics import (
    attribute_accuracy,
    average_precision,
    best_region,
    class_ap,
    detection_metrics,
    match_detections,
    object_recall,
)


def regions(boxes, labels, scores, colors=None) -> Regions:
    n = len(boxes)
    colors = colors if colors is not None else [0] * n
    return Regions(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        features=torch.zeros(n, 4),
        class_probs=torch.zeros(n, 3),
        labels=torch.tensor(labels, dtype=torch.long),
        attributes={
            "color": torch.nn.functional.one_hot(torch.tensor(colors, dtype=torch.long), 3).float()
        },
        scores=torch.tensor(scores, dtype=torch.float32),
        image_size=(100, 100),
    )


def target(boxes, labels, colors) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attributes": {"color": torch.tensor(colors, dtype=torch.long)},
    }


A, B, C = [0, 0, 10, 10], [50, 50, 70, 70], [20, 0, 40, 20]


def test_average_precision_all_point():
    # ranked: TP, FP, TP with 2 objects: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 2) == pytest.approx(
        0.5 * 1.0 + 0.5 * 2 / 3
    )
    assert average_precision([0.9, 0.8], [True, True], 2) == 1.0
    assert average_precision([0.5], [True], 4) == 0.25  # half the objects never found
    assert average_precision([], [], 3) == 0.0
    assert average_precision([0.1], [False], 0) is None  # nothing to find: unmeasured


def test_average_precision_ranks_by_score_not_input_order():
    assert average_precision([0.1, 0.9], [False, True], 1) == 1.0


def test_duplicates_count_once():
    hits = match_detections(
        torch.tensor([A, A, B], dtype=torch.float32),
        torch.tensor([0.9, 0.8, 0.7]),
        torch.tensor([A], dtype=torch.float32),
    )
    assert hits == [True, False, False]


def test_class_ap_uses_labels_and_iou():
    shifted = [5, 0, 15, 10]  # IoU with A = 50 / 150 = 1/3 < 0.5
    preds = [regions([A, B, shifted], [1, 2, 1], [0.9, 0.8, 0.95])]
    gts = [target([A, B], [1, 1], [0, 0])]
    # class 1, ranked: shifted (FP), A (TP); B is labelled 2 so object B is missed
    assert class_ap(preds, gts, 1) == pytest.approx(0.5 * 0.5)
    assert class_ap(preds, gts, 2) is None


def test_recall_and_best_region_ignore_labels():
    preds = [regions([A, [48, 48, 70, 70]], [2, 2], [0.1, 0.1]), regions([], [], [])]
    gts = [target([A, B], [1, 1], [0, 0]), target([C], [1], [0])]
    assert best_region(preds[0].boxes, gts[0]["boxes"]).tolist() == [0, 1]
    assert object_recall(preds, gts) == pytest.approx(2 / 3)


def test_attribute_accuracy_over_covered_objects_with_known_values():
    preds = [regions([A, B, C], [1, 1, 1], [0.9, 0.9, 0.9], colors=[1, 2, 0])]
    # A right, B wrong, C's colour unknown; the object far away is not covered
    gts = [target([A, B, C, [80, 80, 99, 99]], [1, 1, 1, 1], [1, 0, -1, 2])]
    assert attribute_accuracy(preds, gts, "color") == 0.5
    assert attribute_accuracy([regions([], [], [])], [target([A], [1], [1])], "color") is None


def test_detection_metrics_report():
    preds = [regions([A, B], [1, 2], [0.9, 0.8], colors=[0, 1])]
    gts = [target([A, B], [1, 2], [0, 1])]
    report = detection_metrics(preds, gts, ["circle", "square"], ["color"])
    assert report == {
        "map50": 1.0,
        "ap50_circle": 1.0,
        "ap50_square": 1.0,
        "recall50": 1.0,
        "color_accuracy": 1.0,
    }
    missing = detection_metrics(preds, gts, ["circle", "square", "triangle"], ["color"])
    assert missing["ap50_triangle"] is None and missing["map50"] == 1.0
