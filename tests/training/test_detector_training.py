"""Detector training on shapes-world records: targets, a short run, its report."""

from __future__ import annotations

import pytest
import torch

from service.data.records import load_records
from service.data.shapes import write_split
from service.models.detector import DetectorConfig, RegionDetector
from service.training.detector import record_image, record_target, train_detector


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_split(root, "train", 6, progress=False)
    write_split(root, "val", 3, progress=False)
    return root


def test_record_target_follows_the_config_vocabulary():
    cfg = DetectorConfig()
    record = {
        "objects": [
            {"box": [1, 2, 30, 40], "shape": "triangle", "color": "teal", "size": "large"},
            {"box": [50, 50, 60, 60], "shape": "circle", "color": "red", "size": None},
        ]
    }
    t = record_target(record, cfg)
    assert t["boxes"].tolist() == [[1, 2, 30, 40], [50, 50, 60, 60]]
    assert t["labels"].tolist() == [3, 1]
    assert t["attributes"]["color"].tolist() == [6, 0]
    assert t["attributes"]["size"].tolist() == [1, -1]  # unknown size teaches nothing
    record["objects"][1]["shape"] = None  # easy-VQA image whose shape no question states
    assert record_target(record, cfg) is None


def test_record_image_is_what_the_detector_reads(shapes_dir):
    record = load_records(shapes_dir, "train")[0]
    image = record_image(shapes_dir, record)
    assert image.shape == (3, record["height"], record["width"])
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0


def test_a_short_run_returns_a_trained_model_and_its_report(shapes_dir):
    cfg = DetectorConfig(rpn_post_nms_top_n_train=100, box_batch_size_per_image=32)
    model, metrics = train_detector(
        load_records(shapes_dir, "train"),
        load_records(shapes_dir, "val"),
        shapes_dir,
        cfg,
        steps=2,
        batch_size=2,
        lr=1e-3,
        seed=0,
        progress=False,
    )
    assert isinstance(model, RegionDetector) and not model.training
    for key in ("map50", "recall50", "color_accuracy", "best_step", "seconds_per_step"):
        assert key in metrics
    assert 0.0 <= metrics["map50"] <= 1.0 and metrics["train_images"] == 6
    fresh = RegionDetector.from_config(cfg)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
