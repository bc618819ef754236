"""Region detector: losses, extracted regions, batching, checkpoints, both backbones."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from service.models.detector import COLORS, DetectorConfig, RegionDetector
from service.models.regions import lxmert_boxes, select_regions, vilbert_location

RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}


def scene(seed: int, width: int = 128, height: int = 128, n: int = 3) -> tuple[torch.Tensor, dict]:
    """A pastel canvas with n coloured shapes (1 circle, 2 rectangle, 3 triangle) and its target."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(image)
    boxes, labels, colors, sizes = [], [], [], []
    for _ in range(n):
        large = bool(rng.random() < 0.5)
        side = int(rng.integers(36, 51) if large else rng.integers(15, 26))
        side = min(side, width - 1, height - 1)
        x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        shape, color = int(rng.integers(1, 4)), int(rng.integers(0, len(COLORS)))
        box = [x, y, x + side, y + side]
        fill = RGB[COLORS[color]]
        if shape == 1:
            draw.ellipse(box, fill=fill)
        elif shape == 2:
            box[3] = y + side // 2
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, y + side), (x + side, y + side), (x + side / 2, y)], fill=fill)
        boxes.append(box)
        labels.append(shape)
        colors.append(color)
        sizes.append(int(large))
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels),
        "attributes": {"color": torch.tensor(colors), "size": torch.tensor(sizes)},
    }
    return pixels, target


def tiny(seed: int = 0, **overrides) -> RegionDetector:
    torch.manual_seed(seed)
    return RegionDetector.from_config(DetectorConfig(**overrides)).eval()


@pytest.fixture(scope="module")
def detector() -> RegionDetector:
    return tiny()


# ------------------------------------------------------------------------------ config


def test_config_rebuilds_from_its_json():
    cfg = DetectorConfig()
    assert (cfg.min_size, cfg.max_size, cfg.representation_size) == (128, 256, 256)
    assert cfg.attributes["color"] == COLORS and cfg.attributes["size"] == ["small", "large"]
    data = json.loads(json.dumps(asdict(cfg)))
    rebuilt = RegionDetector.from_config(data)
    assert rebuilt.config == cfg
    assert DetectorConfig(backbone="resnet50_fpn").min_size == 600


@pytest.mark.parametrize(
    "bad",
    [
        dict(backbone="vgg"),
        dict(num_classes=4),
        dict(min_regions=40),
        dict(backbone_weights="w.safetensors"),  # tiny has no pretrained weights
    ],
)
def test_config_refuses_inconsistent_values(bad):
    with pytest.raises(ValueError):
        DetectorConfig(**bad)


# ---------------------------------------------------------------------------- training


def test_train_mode_returns_finite_losses_with_attributes(detector):
    images, targets = zip(*[scene(1), scene(2, 96, 80)], strict=True)
    detector.train()
    try:
        losses = detector(list(images), list(targets))
    finally:
        detector.eval()
    assert set(losses) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_attr_color",
        "loss_attr_size",
    }
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    # untrained: colour loss near ln 8, size near ln 2
    assert losses["loss_attr_color"].item() == pytest.approx(np.log(8), rel=0.3)
    assert losses["loss_attr_size"].item() == pytest.approx(np.log(2), rel=0.3)


def test_image_without_objects_trains():
    model = tiny().train()
    image, _ = scene(3, n=1)
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "attributes": {"color": torch.zeros(0, dtype=torch.int64), "size": torch.zeros(0)},
    }
    losses = model([image], [empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_attr_color"].item() == 0.0  # no positive RoI to learn from


def test_unknown_attributes_teach_nothing():
    model = tiny().train()
    image, target = scene(12)
    unknown = {"color": target["attributes"]["color"], "size": torch.full((3,), -1)}
    losses = model([image], [dict(target, attributes=unknown)])
    assert losses["loss_attr_size"].item() == 0.0 and losses["loss_attr_color"].item() > 0


def test_bad_targets_are_refused_with_a_clear_error(detector):
    image, target = scene(4)
    detector.train()
    try:
        flipped = dict(target, boxes=target["boxes"][:, [2, 3, 0, 1]])
        with pytest.raises(ValueError, match="x2 > x1"):
            detector([image], [flipped])
        with pytest.raises(ValueError, match="attributes"):
            detector([image], [dict(target, attributes={"color": target["labels"]})])
        with pytest.raises(ValueError, match="one target"):
            detector([image])
    finally:
        detector.eval()


def test_a_few_training_steps_lower_the_loss():
    model = tiny(seed=1, rpn_post_nms_top_n_train=100, box_batch_size_per_image=64).train()
    images, targets = map(list, zip(*[scene(10), scene(11)], strict=True))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    totals, attrs = [], []
    for _ in range(8):
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
        attrs.append(losses["loss_attr_color"].item())
    assert np.mean(totals[-2:]) < 0.5 * np.mean(totals[:2]), totals
    assert attrs[-1] < 0.5 * attrs[0], attrs


# -------------------------------------------------------------------------- extraction


def test_extract_gives_well_formed_regions_for_each_image(detector):
    sizes = [(128, 128), (64, 64), (100, 180)]
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(h)) for h, w in sizes]
    regions = detector.extract(images)
    assert len(regions) == 3
    for r, (h, w) in zip(regions, sizes, strict=True):
        n = len(r)
        assert 10 <= n <= 36
        assert r.image_size == (h, w)
        assert r.boxes.shape == (n, 4) and r.features.shape == (n, 256)
        assert (r.boxes[:, 0] >= 0).all() and (r.boxes[:, 1] >= 0).all()
        assert (r.boxes[:, 2] <= w).all() and (r.boxes[:, 3] <= h).all()
        assert (r.boxes[:, 2:] >= r.boxes[:, :2]).all()
        assert r.class_probs.shape == (n, 4)
        torch.testing.assert_close(r.class_probs.sum(1), torch.ones(n))
        assert set(r.attributes) == {"color", "size"}
        assert r.attributes["color"].shape == (n, 8) and r.attributes["size"].shape == (n, 2)
        torch.testing.assert_close(r.attributes["color"].sum(1), torch.ones(n))
        # score: the probability of the class each region was kept for
        assert ((r.labels >= 1) & (r.labels <= 3)).all()
        torch.testing.assert_close(r.scores, r.class_probs.gather(1, r.labels[:, None])[:, 0])


def test_region_count_follows_the_score_threshold():
    image, _ = scene(5)
    # nothing passes a threshold of 1: filled up to exactly min_regions
    assert len(tiny(score_thresh=1.0).extract([image])[0]) == 10
    # everything passes 0: capped at max_regions
    assert len(tiny(score_thresh=0.0, max_regions=20).extract([image])[0]) == 20


def test_extract_restores_training_mode(detector):
    detector.train()
    try:
        detector.extract([torch.rand(3, 64, 64)])
        assert detector.training
    finally:
        detector.eval()


def test_non_images_are_refused(detector):
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        detector.extract([torch.rand(64, 64)])
    with pytest.raises(ValueError, match="no images"):
        detector.extract([])


def test_an_image_gets_the_same_regions_alone_as_in_a_batch(detector):
    """Padding never leaks in: boxes agree to 1e-3 px, features to 1e-4 (measured: 0 and
    about 1e-8; only the box head's matrix product sees a different batch size)."""
    images = [scene(6)[0], scene(7, 64, 64, n=1)[0], scene(8, 180, 100)[0], torch.rand(3, 90, 120)]
    batched = detector.extract(images)
    for image, together in zip(images, batched, strict=True):
        alone = detector.extract([image])[0]
        assert len(alone) == len(together)
        torch.testing.assert_close(alone.boxes, together.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(alone.features, together.features, atol=1e-4, rtol=0)
        torch.testing.assert_close(alone.class_probs, together.class_probs, atol=1e-4, rtol=0)


def test_state_dict_round_trips_through_safetensors(detector, tmp_path):
    path = tmp_path / "detector.safetensors"
    save_file(detector.state_dict(), str(path))
    other = tiny(seed=99)
    image = scene(9)[0]
    assert not torch.equal(
        other.extract([image])[0].features, detector.extract([image])[0].features
    )
    other.load_state_dict(load_file(str(path)), strict=True)
    torch.testing.assert_close(
        other.extract([image])[0].features, detector.extract([image])[0].features
    )


# ------------------------------------------------------------------------ resnet50_fpn


def test_resnet50_fpn_loads_a_local_weights_file_and_extracts(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(3)
    weights = resnet50().state_dict()  # what torchvision's ImageNet file holds, random here
    path = tmp_path / "resnet50.safetensors"
    save_file(weights, str(path))
    cfg = DetectorConfig(
        backbone="resnet50_fpn",
        backbone_weights=str(path),
        min_size=64,
        max_size=96,
        representation_size=64,
    )
    model = RegionDetector.from_config(cfg).eval()
    body = model.backbone.body
    torch.testing.assert_close(body.conv1.weight, weights["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        body.layer4[2].bn3.running_var, weights["layer4.2.bn3.running_var"], rtol=0, atol=0
    )
    regions = model.extract([torch.rand(3, 64, 80)])[0]
    assert 10 <= len(regions) <= 36 and regions.features.shape[1] == 64

    save_file({**weights, "head.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not a ResNet-50"):
        RegionDetector.from_config(cfg)


# ----------------------------------------------------------------------------- helpers


def test_vilbert_location_and_lxmert_boxes_on_hand_made_boxes():
    boxes = torch.tensor([[0.0, 0.0, 200.0, 100.0], [50.0, 25.0, 150.0, 75.0]])
    loc = vilbert_location(boxes, width=200, height=100)
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [0.25, 0.25, 0.75, 0.75, 0.25]])
    torch.testing.assert_close(loc, expected)
    torch.testing.assert_close(lxmert_boxes(boxes, 200, 100), expected[:, :4])


def test_select_regions_suppresses_overlaps_and_fills_up():
    # 0 and 1 overlap (IoU 0.81) and 0 wins both classes; 2 stands apart; 3 is weak
    boxes = torch.tensor(
        [[0, 0, 10, 10], [0, 0, 9, 9], [50, 50, 60, 60], [20, 20, 30, 30]], dtype=torch.float32
    )
    boxes = boxes[:, None, :].expand(4, 2, 4)  # same box for both classes
    scores = torch.tensor([[0.9, 0.08], [0.8, 0.05], [0.1, 0.7], [0.15, 0.1]])
    idx, cls = select_regions(boxes, scores, 0.3, 0.5, min_regions=1, max_regions=5)
    assert idx.tolist() == [0, 2] and cls.tolist() == [0, 1]  # 1 suppressed by 0
    idx, _ = select_regions(boxes, scores, 0.3, 0.5, min_regions=1, max_regions=1)
    assert idx.tolist() == [0]
    # filling: surviving 3 first; suppressed 1 only after every survivor
    idx, cls = select_regions(boxes, scores, 0.3, 0.5, min_regions=4, max_regions=5)
    assert idx.tolist() == [0, 2, 3, 1] and cls.tolist() == [0, 1, 0, 0]
    idx, _ = select_regions(boxes, scores, 0.3, 0.5, min_regions=9, max_regions=9)
    assert len(idx) == 4  # never more than there are proposals
