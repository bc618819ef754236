"""PairSource, negative captions, soft answer targets, region padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.data.language import ANSWERS
from service.training.examples import (
    PairSource,
    answer_targets,
    other_caption,
    other_image,
    other_sentence,
    pad_regions,
)
from tests.training.pretrain_support import FEATURE_DIM, write_tiny_split


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> PairSource:
    data_dir, features_dir = write_tiny_split(tmp_path_factory.mktemp("examples"), n=12)
    return PairSource.load(data_dir, features_dir, "train")


def test_source_joins_records_and_regions(source):
    assert len(source) == 12 and source.ids[0] == "train_0"
    regions = source.regions(3)
    objects = source.objects(3)
    assert len(regions.boxes) == len(objects) + 2  # objects + 2 background regions
    w, h = source.size(3)
    x1, y1, x2, y2 = objects[0]["box"]
    torch.testing.assert_close(regions.boxes[0], torch.tensor([x1 / w, y1 / h, x2 / w, y2 / h]))
    rs = source.region_set(3)
    assert rs.features.dtype == torch.float32 and rs.features.shape[-1] == FEATURE_DIM
    assert source.captions(3) and source.questions(3)[0].keys() >= {"question", "answer"}
    texts = [t for t, _ in source.sentences(3)]
    assert texts[: len(source.captions(3))] == source.captions(3)
    assert len(source.subset([5, 1])) == 2 and source.subset([5, 1]).ids == ["train_5", "train_1"]


def test_records_without_regions_are_dropped(source):
    records = source.records + [dict(source.records[0], id="no_regions")]
    assert "no_regions" not in PairSource(records, source.features).ids


def test_negatives_come_from_other_images(source):
    rng = np.random.default_rng(0)
    assert all(other_image(12, 4, rng) != 4 for _ in range(200))
    assert {other_image(12, 4, rng) for _ in range(500)} == set(range(12)) - {4}
    for i in range(len(source)):
        for _ in range(20):
            assert other_caption(source, i, rng) not in source.captions(i)
            assert other_sentence(source, i, rng) not in {t for t, _ in source.sentences(i)}


def test_answer_targets_give_vqa_soft_scores():
    t = answer_targets("red", ANSWERS)
    assert t.shape == (len(ANSWERS),) and t.sum() == 1 and t[ANSWERS.index("red")] == 1
    t = answer_targets(["2", "2", "3", "2", "2", "two"], ANSWERS)  # 4 x "2", 1 x "3"
    assert t[ANSWERS.index("2")] == 1.0 and t[ANSWERS.index("3")] == pytest.approx(0.3)
    assert t.sum() == pytest.approx(1.3)  # "two" is not in the vocabulary
    t = answer_targets({"yes": 0.6, "no": 0.3}, {"no": 0, "yes": 1})
    assert t.tolist() == pytest.approx([0.3, 0.6])
    assert answer_targets("purple", ANSWERS).sum() == 0


def test_pad_regions_aligns_with_collate(source):
    regions = [source.regions(i) for i in (0, 1)]
    r = max(len(x.boxes) for x in regions)
    padded = pad_regions(regions, r)
    assert padded["class_probs"].shape == (2, r, 4)
    assert padded["attr_color"].shape == (2, r, 8) and padded["attr_size"].shape == (2, r, 2)
    n0 = len(regions[0].boxes)
    torch.testing.assert_close(padded["class_probs"][0, :n0], regions[0].class_probs.float())
    assert (padded["class_probs"][0, n0:] == 0).all()
