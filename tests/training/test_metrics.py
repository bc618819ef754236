"""Every metric on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service.training.metrics import (
    box_iou,
    gold_ranks,
    grounding_accuracy,
    match_accuracy,
    paired_iou,
    recall_at_k,
    vqa_accuracy,
)


def test_vqa_accuracy_overall_and_by_family():
    pred = ["yes", "red", "2", "circle", "no"]
    gold = ["yes", "blue", "2", "circle", "yes"]
    fams = ["exist", "color", "count", "shape", "exist"]
    out = vqa_accuracy(pred, gold, fams)
    assert out["overall"] == pytest.approx(3 / 5)
    assert out["count"] == 5
    assert out["by_family"] == {"exist": 0.5, "color": 0.0, "count": 1.0, "shape": 1.0}
    assert out["by_family_count"]["exist"] == 2


def test_vqa_accuracy_empty_family_is_none_not_zero():
    out = vqa_accuracy(["yes"], ["yes"], ["exist"], all_families=("exist", "relation"))
    assert out["by_family"] == {"exist": 1.0, "relation": None}
    assert out["by_family_count"]["relation"] == 0
    json.dumps(out)  # None survives JSON; NaN would not be valid JSON


def test_vqa_accuracy_no_questions():
    out = vqa_accuracy([], [], [])
    assert out["overall"] is None and out["count"] == 0


def test_vqa_accuracy_rejects_unequal_lengths():
    with pytest.raises(ValueError):
        vqa_accuracy(["yes"], ["yes", "no"], ["exist"])


def test_recall_from_score_matrix():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # gold 0 ranked 1st
            [0.5, 0.4, 0.3],  # gold 2 ranked 3rd
            [0.1, 0.8, 0.7],  # gold 2 ranked 2nd
        ]
    )
    gold = [0, 2, 2]
    assert list(gold_ranks(scores, gold)) == [1, 3, 2]
    r = recall_at_k(scores, gold, ks=(1, 2, 3))
    assert r == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}


def test_recall_ties_count_against_the_gold_item():
    flat = np.zeros((4, 10))  # a model that scores every image the same
    r = recall_at_k(flat, [0, 3, 5, 9], ks=(1, 5, 10))
    assert r == {"R@1": 0.0, "R@5": 0.0, "R@10": 1.0}
    tie = [[1.0, 1.0, 0.0]]  # gold ties with one other item: rank 2
    assert recall_at_k(tie, [1], ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0}


def test_recall_from_ranked_ids():
    ranked = [["b", "a", "c"], ["c", "b"], ["a"]]
    gold = ["a", "c", "z"]  # 2nd, 1st, absent
    assert recall_at_k(ranked, gold, ks=(1, 2)) == {
        "R@1": pytest.approx(1 / 3),
        "R@2": pytest.approx(2 / 3),
    }
    ids = np.array([[4, 7, 1], [1, 4, 7]])  # integer arrays are ranked ids, not scores
    assert recall_at_k(ids, [7, 7], ks=(1, 3)) == {"R@1": 0.0, "R@3": 1.0}


def test_recall_checks_gold_indices():
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((2, 3)), [0, 3])


def test_box_iou_hand_made():
    a = [[0, 0, 2, 2], [0, 0, 1, 1]]
    b = [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]]
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    expected = torch.tensor([[1 / 7, 1.0, 0.0], [0.0, 0.25, 0.0]], dtype=torch.float64)
    assert torch.allclose(iou, expected)
    # touching edges share no area; a zero-area box has IoU 0, even with itself
    assert box_iou([[0, 0, 1, 1]], [[1, 0, 2, 1]]).item() == 0.0
    assert box_iou([[1, 1, 1, 3]], [[1, 1, 1, 3]]).item() == 0.0
    assert torch.allclose(paired_iou(a, b[:2]), torch.tensor([1 / 7, 0.25], dtype=torch.float64))


def test_grounding_accuracy_threshold_is_inclusive():
    gold = [[0, 0, 1, 1]] * 3
    pred = [
        [0, 0, 1, 0.5],  # IoU exactly 0.5: counts
        [0, 0, 1, 0.49],  # just under
        [0, 0, 1, 1],
    ]
    assert grounding_accuracy(pred, gold) == pytest.approx(2 / 3)
    assert grounding_accuracy(pred, gold, iou=0.9) == pytest.approx(1 / 3)
    assert grounding_accuracy([], []) is None


def test_match_accuracy_pairs_ranking_and_binary():
    pos = [2.0, 0.5, -1.0, 3.0]
    neg = [-1.0, 1.0, -2.0, 0.0]
    out = match_accuracy(pos, neg)
    # pair rule: pos > 0 and neg < 0 -> only pair 0 (pair 3's negative sits at 0)
    assert out["accuracy"] == 0.25
    assert out["ranking"] == 0.75  # pos > neg in pairs 0, 2, 3
    assert out["binary"] == pytest.approx(5 / 8)
    assert out["count"] == 4
    ties = match_accuracy([1.0], [1.0])
    assert ties["ranking"] == 0.0 and ties["accuracy"] == 0.0


def test_recall_with_several_right_items():
    # query 0: items 1 and 2 both fit the caption; item 2 is ranked first -> a hit
    scores = np.array([[0.1, 0.5, 0.9, 0.7], [0.9, 0.8, 0.1, 0.2]])
    gold = [{1, 2}, [2, 3]]  # query 1: its right items rank 3rd and 4th
    assert list(gold_ranks(scores, gold)) == [1, 3]
    assert recall_at_k(scores, gold, ks=(1, 3)) == {"R@1": 0.5, "R@3": 1.0}
    assert recall_at_k([[3, 2, 1], [0, 1, 2]], [{1, 2}, {2}], ks=(1, 2)) == {
        "R@1": 0.0,
        "R@2": 0.5,
    }
