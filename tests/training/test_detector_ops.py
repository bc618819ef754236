"""The detector's commands: train into the store, evaluate, precompute features, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torchvision.ops import box_iou

from service.cli import build_parser, main
from service.data.easyvqa import load_split
from service.data.features import FeatureFile
from service.data.records import load_records
from service.data.shapes import write_split
from service.store import ChecksumMismatch, ModelStore
from service.training import detector_ops
from service.training.detector import record_image
from service.training.detector_ops import (
    load_detector,
    run_eval_detector,
    run_features,
    run_train_detector,
)

TINY = dict(
    representation_size=32,
    rpn_post_nms_top_n_train=64,
    rpn_post_nms_top_n_test=32,
    box_batch_size_per_image=32,
    min_regions=4,
    max_regions=8,
)


@pytest.fixture(autouse=True)
def few_easyvqa_images(monkeypatch):
    """Six real easy-VQA images per split instead of thousands, to stay fast."""
    monkeypatch.setattr(detector_ops, "_easyvqa", lambda split: load_split(split)[:6])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        write_split(root, split, n, progress=False)
    return root


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    store_root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(detector_ops, "_easyvqa", lambda split: load_split(split)[:6])
        manifest = run_train_detector(
            data_dir,
            store_root,
            config_overrides=TINY,
            steps=3,
            batch_size=2,
            eval_every=0,
            command="vqa train detector --steps 3",
            progress=False,
        )
    return store_root, manifest


def test_train_writes_an_entry_that_rebuilds_the_detector(trained):
    store_root, m = trained
    assert (m.name, m.kind, m.version, m.tasks) == ("shapes-detector", "detector", 1, ["detect"])
    assert m.config["representation_size"] == 32 and m.config["backbone_weights"] is None
    assert m.data["seed"] == 0 and m.data["steps"] == 3 and m.data["shapes_train_images"] == 8
    assert m.data["easyvqa_train_images"] >= 5  # six images, at most one shape unstated
    assert m.command == "vqa train detector --steps 3"
    assert {"val/map50", "val/recall50", "train/best_step", "train/seconds"} <= set(m.metrics)
    store = ModelStore(store_root)
    store.verify(m)
    stored = store.load_tensors(m)
    assert stored["roi_heads.box_head.fc6.weight"].dtype == torch.float16
    model, manifest = load_detector(store_root, "shapes-detector")
    assert manifest.ref == "shapes-detector@1"
    for name, value in model.state_dict().items():
        assert torch.equal(value, stored[name].to(value.dtype)), name


def test_a_changed_byte_is_refused(trained, tmp_path):
    store_root, m = trained
    copy = tmp_path / "store"
    shutil.copytree(store_root, copy)
    weights = copy / m.name / str(m.version) / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatch, match="sha256 mismatch"):
        load_detector(copy, m.ref)


def test_eval_writes_the_report_and_updates_the_manifest(trained, data_dir, tmp_path):
    store_root, m = trained
    out = tmp_path / "report.json"
    report = run_eval_detector(m.ref, store_root, out=out, progress=False)
    written = json.loads(out.read_text())
    assert written["model"] == m.ref and written["data_dir"] == str(data_dir)
    shapes = written["test"]
    assert shapes["images"] == 4
    for key in ("map50", "ap50_circle", "ap50_rectangle", "ap50_triangle", "recall50"):
        assert key in shapes
    assert {"color_accuracy", "size_accuracy"} <= set(shapes)  # None where nothing is covered
    easy = written["easyvqa_test"]
    assert easy["images"] == 6 and 0.0 <= easy["shape_found"] <= easy["recall50"] <= 1.0
    # shape_found: the best-scoring region of each image overlaps the shape at IoU >= 0.5
    model, _ = load_detector(store_root, m.ref)
    found = 0
    for record in load_split("test")[:6]:
        regions = model.extract([record_image("", record)])[0]
        top = regions.boxes[regions.scores.argmax()][None]
        found += box_iou(top, torch.tensor([record["objects"][0]["box"]]).float()).item() >= 0.5
    assert easy["shape_found"] == found / 6
    assert report["easyvqa_test"] == easy
    metrics = ModelStore(store_root).resolve(m.ref).metrics
    assert metrics["test/recall50"] == shapes["recall50"]
    assert metrics["easyvqa_test/shape_found"] == easy["shape_found"]
    assert "val/map50" in metrics  # training's metrics are kept


def test_features_hold_each_images_regions_as_extract_finds_them(trained, data_dir, tmp_path):
    store_root, m = trained
    paths = run_features(m.ref, store_root, data_dir, tmp_path, splits=["train", "val"])
    names = [p.name for p in paths]
    assert names == [f"{s}.safetensors" for s in ("train", "val", "easyvqa_train", "easyvqa_test")]
    model, _ = load_detector(store_root, m.ref)
    records = load_records(data_dir, "val")
    features = FeatureFile(tmp_path / "val.safetensors")
    assert features.ids == [r["id"] for r in records]
    assert features.meta["detector"] == m.ref and features.meta["split"] == "val"
    for i, record in enumerate(records):
        stored = features[i]
        alone = model.extract([record_image(data_dir, record)])[0]
        assert 4 <= len(stored.boxes) <= 8 and stored.features.shape[1] == 32
        assert 0.0 <= stored.boxes.min() and stored.boxes.max() <= 1.0
        scale = torch.tensor([record["width"], record["height"]] * 2)
        # batched vs alone: equal up to float error; features are stored as float16
        torch.testing.assert_close(stored.boxes, alone.boxes / scale, atol=1e-4, rtol=0)
        torch.testing.assert_close(stored.features.float(), alone.features, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(stored.scores, alone.scores, atol=1e-4, rtol=0)
    easy = FeatureFile(tmp_path / "easyvqa_test.safetensors")
    assert easy.ids == [r["id"] for r in load_split("test")[:6]]
    assert easy[0].boxes.max() <= 1.0  # 64 px images: normalised by their own size


def test_cli_parses_the_detector_commands():
    parser = build_parser()
    a = parser.parse_args(["train", "detector", "--data", "d", "--steps", "5", "--no-easyvqa"])
    assert (a.func.__name__, a.data, a.steps, a.easyvqa, a.name) == (
        "_train_detector",
        "d",
        5,
        False,
        "shapes-detector",
    )
    a = parser.parse_args(["eval", "detector", "--model", "shapes-detector@2"])
    assert (a.what, a.model, a.easyvqa, a.data) == ("detector", "shapes-detector@2", True, None)
    a = parser.parse_args(["eval", "--model", "vilbert-vqa", "--task", "vqa"])
    assert (a.what, a.model, a.task) == (None, "vilbert-vqa", "vqa")
    a = parser.parse_args(["features", "--detector", "x", "--data", "d", "--out", "o"])
    assert (a.func.__name__, a.splits, a.easyvqa, a.out) == (
        "_features",
        ["train", "val", "test"],
        True,
        "o",
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "detectors", "--model", "x"])


def test_cli_eval_detector_runs_end_to_end(trained, tmp_path, capsys):
    store_root, m = trained
    out = tmp_path / "exp"
    code = main(
        ["eval", "detector", "--model", m.ref, "--store", str(store_root), "--out", str(out)]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["path"] == str(out / "detector_metrics.json")
    assert "map50" in json.loads((out / "detector_metrics.json").read_text())["test"]
    assert main(["eval", "detector", "--model", "nope", "--store", str(store_root)]) == 1
