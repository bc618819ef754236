"""run_eval on tiny store entries whose heads are set by hand, so every number is known.

The models answer "yes" to everything, score every region alike (so the first region,
which is the first object's, is chosen) and call every caption a match. What each
metric must then be follows from the records alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.data.easyvqa import load_split
from service.data.features import ImageRegions, write_feature_file
from service.data.language import ANSWERS
from service.data.records import load_records
from service.data.shapes import ShapeObject
from service.models.backbone import build_backbone
from service.store import ModelStore
from service.training.evaluate import relevant_images, run_eval
from service.training.negatives import caption_holds
from tests.training.pretrain_support import DETECTOR, FEATURE_DIM, tiny_overrides, write_tiny_split

HISTORY = [
    {"kind": "train", "step": s, "lr": 1e-3, "loss": 3.0 / s, "vqa": 3.0 / s} for s in range(1, 21)
] + [{"kind": "eval", "step": 20, "vqa_accuracy": 0.4, "score": 0.4}]


pytestmark = pytest.mark.usefixtures("one_thread")


def _fixed_heads(kind: str) -> torch.nn.Module:
    """A tiny model that answers "yes", ties every region and matches every caption."""
    torch.manual_seed(0)
    model = build_backbone(kind, tiny_overrides(kind))
    yes = ANSWERS.index("yes")
    with torch.no_grad():
        if kind == "vilbert":
            answer, ground, align = model.answer_head.mlp[3], model.ground_head, model.align_head
            align_bias = [1.0, 0.0]  # index 0 = matched
        else:
            answer = model.answer_head.logit_fc[3]
            ground, align = model.extra_heads.grounding, model.cls.seq_relationship
            align_bias = [0.0, 1.0]  # index 1 = matched
        answer.weight.zero_()
        answer.bias.fill_(-5.0)
        answer.bias[yes] = 5.0
        ground.weight.zero_()
        ground.bias.zero_()
        align.weight.zero_()
        align.bias.copy_(torch.tensor(align_bias))
    return model


def _entry(store: ModelStore, kind: str, detector: str = DETECTOR, **meta):
    model = _fixed_heads(kind)
    return store.write(
        f"fixed-{kind}",
        kind,
        {"model.safetensors": model.state_dict()},
        config=tiny_overrides(kind),
        extra_files={"history.json": json.dumps(HISTORY).encode()},
        answers=list(ANSWERS),
        detector=detector,
        tasks=["vqa", "match", "ground", "retrieval"],
        **meta,
    )


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    root = tmp_path_factory.mktemp("eval")
    data, features = write_tiny_split(root, "test", n=24)
    return data, features, load_records(data, "test")


@pytest.mark.parametrize("kind", ["vilbert", "lxmert"])
def test_every_metric_of_a_model_with_known_answers(tmp_path, split, kind):
    data, features, records = split
    store = ModelStore(tmp_path / "store")
    m = _entry(store, kind)
    out = tmp_path / "report"
    results = run_eval(m.ref, store.root, "all", features, data, out_dir=out, progress=False)

    questions = [q for r in records for q in r["questions"]]
    vqa = results["vqa"]
    assert vqa["count"] == len(questions)
    assert vqa["overall"] == pytest.approx(np.mean([q["answer"] == "yes" for q in questions]))
    for family, acc in vqa["by_family"].items():
        same = [q["answer"] == "yes" for q in questions if q["family"] == family]
        assert acc == pytest.approx(np.mean(same)), family

    refs = [e for r in records for e in r["refexps"]]
    assert results["grounding"]["count"] == len(refs)
    assert results["grounding"]["accuracy"] == pytest.approx(
        np.mean([e["index"] == 0 for e in refs])  # ties go to the first region
    )
    assert results["grounding"]["upper_bound"] == 1.0  # every object has its region

    match = results["match"]  # every caption is a match: no pair is right
    assert match["positive_rate"] == 1.0 and match["partial_positive_rate"] == 1.0
    for neg in ("random", "hard"):
        assert match[neg]["count"] == len(records)
        assert match[neg]["accuracy"] == 0.0 and match[neg]["ranking"] == 0.0
        assert match[neg]["binary"] == 0.5
    assert set(match["hard"]["ranking_by_kind"]) == set(match["hard"]["by_kind"])
    assert set(match["hard"]["ranking_by_kind"].values()) == {0.0}  # ties rank wrong

    retrieval = results["retrieval"]
    n = len(records)
    assert retrieval["gallery_size"] == n and retrieval["align_queries"] == n
    relevant = relevant_images([r["captions"][0] for r in records], [r["objects"] for r in records])
    ranks = np.array([n - len(rel) + 1 for rel in relevant])  # all tied: the gold comes last
    for k in (1, 5, 10):
        assert retrieval["align"][f"R@{k}"] == pytest.approx(np.mean(ranks <= k))
    assert retrieval["two_stage"] == retrieval["embed"]  # a constant head keeps the order
    assert retrieval["two_stage_same_queries"] == retrieval["two_stage"]  # every query aligned

    # the report: metrics.json, plots, and the manifest's metrics
    report = json.loads((out / "metrics.json").read_text())
    assert report["model"] == m.ref and report["splits"]["test"] == json.loads(json.dumps(results))
    for png in ("vqa_by_family.png", "training_curves.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width > 200
    manifest = store.resolve(m.ref)
    assert manifest.metrics["test/vqa/overall"] == pytest.approx(vqa["overall"])
    assert manifest.metrics["test/match/hard/accuracy"] == 0.0
    assert manifest.metrics["test/retrieval/two_stage/R@1"] == retrieval["two_stage"]["R@1"]
    assert manifest.metrics["test/vqa/by_family/count"] == vqa["by_family"]["count"]
    for kind in match["hard"]["by_kind"]:  # "count" among them: a kind, not an item count
        assert f"test/match/hard/by_kind/{kind}" in manifest.metrics
        assert f"test/match/hard/ranking_by_kind/{kind}" in manifest.metrics
    assert "test/vqa/count" not in manifest.metrics  # item counts are no metrics
    assert not any("by_family_count" in k for k in manifest.metrics)
    store.verify(manifest)  # the checksummed files are untouched


def test_reports_of_separate_runs_merge(tmp_path, split):
    data, features, _ = split
    store = ModelStore(tmp_path / "store")
    m = _entry(store, "lxmert", metrics={"val/score": 0.5})
    out = tmp_path / "report"
    run_eval(m.ref, store.root, "grounding", features, data, out_dir=out, progress=False)
    run_eval(m.ref, store.root, "match", features, data, out_dir=out, progress=False)
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["splits"]["test"]) == {"grounding", "match"}
    assert not (out / "vqa_by_family.png").exists()
    metrics = store.resolve(m.ref).metrics
    assert metrics["val/score"] == 0.5  # earlier metrics stay
    assert "test/grounding/accuracy" in metrics and "test/match/random/accuracy" in metrics


def test_features_of_another_detector_are_refused(tmp_path, split):
    data, features, _ = split
    store = ModelStore(tmp_path / "store")
    m = _entry(store, "vilbert", detector="another-detector@2")
    with pytest.raises(ValueError, match="another-detector@2"):
        run_eval(m.ref, store.root, "vqa", features, data, out_dir=tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="task"):
        run_eval(m.ref, store.root, "captioning", features, data, progress=False)


def test_easyvqa_accuracy_on_its_test_features(tmp_path, split):
    data, features, _ = split
    records = load_split("test")[:12]
    rng = np.random.default_rng(0)
    regions = []
    for r in records:
        x1, y1, x2, y2 = r["objects"][0]["box"]
        box = torch.tensor([[x1 / r["width"], y1 / r["height"], x2 / r["width"], y2 / r["height"]]])
        regions.append(
            ImageRegions(
                features=torch.from_numpy(rng.standard_normal((1, FEATURE_DIM))).float(),
                boxes=box.float(),
                class_probs=torch.full((1, 4), 0.25),
                attributes={},
                scores=torch.ones(1),
            )
        )
    write_feature_file(
        features / "easyvqa_test.safetensors",
        [r["id"] for r in records],
        regions,
        {"detector": DETECTOR},
    )
    store = ModelStore(tmp_path / "store")
    m = _entry(store, "vilbert", data={"include_easyvqa": True})
    results = run_eval(
        m.ref, store.root, "vqa", features, data, out_dir=tmp_path / "r", progress=False
    )
    questions = [q for r in records for q in r["questions"]]
    assert results["easyvqa"]["count"] == len(questions)
    assert results["easyvqa"]["overall"] == pytest.approx(
        np.mean([q["answer"] == "yes" for q in questions])
    )
    assert store.resolve(m.ref).metrics["test/easyvqa/overall"] == results["easyvqa"]["overall"]


def test_relevant_images_are_those_the_query_caption_is_true_of():
    def obj(shape, color, box):
        return {"shape": shape, "color": color, "size": "small", "box": box}

    objects = [
        [obj("circle", "red", [0, 0, 10, 10])],
        [obj("circle", "red", [50, 50, 60, 60])],  # the same single red circle elsewhere
        [obj("circle", "blue", [0, 0, 10, 10])],
        [obj("circle", "red", [0, 0, 10, 10]), obj("triangle", "red", [40, 0, 50, 10])],
        [obj("circle", "red", [40, 0, 50, 10]), obj("triangle", "red", [0, 0, 10, 10])],
    ]
    queries = [
        "a small red circle",
        "a small red circle",
        "a small blue circle",
        "a small red circle and a small red triangle. "
        "the small red circle is left of the small red triangle",
        "a small red triangle and a small red circle. "
        "the small red triangle is left of the small red circle",
    ]
    for q, objs in zip(queries, objects, strict=True):
        assert caption_holds(
            q, [ShapeObject(o["shape"], o["color"], o["size"], tuple(o["box"])) for o in objs]
        )
    # same inventory, relation reversed: images 3 and 4 are not each other's
    assert relevant_images(queries, objects) == [{0, 1}, {0, 1}, {2}, {3}, {4}]
