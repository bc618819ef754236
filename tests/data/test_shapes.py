"""The shapes world's scenes and images: determinism, splits, boxes, sizes, overlap."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.data.records import load_image, load_records
from service.data.shapes import (
    COLORS,
    SHAPES,
    SIZES,
    ShapeObject,
    generate_scene,
    render,
    scene_from_objects,
    shape_mask,
    split_rng,
    write_split,
)

EASY_VQA_RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}


def _iou(a, b) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return iw * ih / (area(a) + area(b) - iw * ih)


def _check_scene_pixels(scene, pixels: np.ndarray) -> None:
    """Boxes inside the canvas, tight on and covering the pixels of the object's colour."""
    h, w, _ = pixels.shape
    assert (scene.width, scene.height) == (w, h)
    in_some_box = {c: np.zeros((h, w), bool) for c in COLORS}
    for o in scene.objects:
        x1, y1, x2, y2 = o.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, o
        in_some_box[o.color][y1:y2, x1:x2] = True
        own = (pixels[y1:y2, x1:x2] == EASY_VQA_RGB[o.color]).all(-1)
        # Tight: the object's colour reaches every side of its box.
        assert own[0].any() and own[-1].any() and own[:, 0].any() and own[:, -1].any(), o
    for name, rgb in EASY_VQA_RGB.items():
        coloured = (pixels == rgb).all(-1)
        # Covering: no pixel of an object's colour lies outside that colour's boxes.
        assert not (coloured & ~in_some_box[name]).any(), name
    outside = ~np.logical_or.reduce(list(in_some_box.values()))
    assert (pixels[outside] == scene.background).all()


def test_vocabulary_and_palette_match_easy_vqa():
    assert SHAPES == ("circle", "rectangle", "triangle")
    assert dict(COLORS) == EASY_VQA_RGB and list(COLORS) == list(EASY_VQA_RGB)
    assert SIZES == ("small", "large")


@settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(seed=st.integers(0, 2**31 - 1), size=st.sampled_from([64, 96, 128, 160]))
def test_scene_geometry_holds_for_any_seed_and_canvas(seed, size):
    scene = generate_scene(np.random.default_rng(seed), size=size)
    assert 1 <= len(scene.objects) <= 6
    _check_scene_pixels(scene, np.asarray(render(scene)))
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1 :]:
            assert _iou(a.box, b.box) <= 0.1


def test_many_scenes_boxes_sizes_iou_and_vocabulary():
    n_objects, sizes, kinds = set(), {"small": 0, "large": 0}, set()
    for i in range(250):
        scene = generate_scene(split_rng(7, "train", i))
        pixels = np.asarray(render(scene))
        _check_scene_pixels(scene, pixels)
        assert all(225 <= c <= 255 for c in scene.background)  # light pastel
        n_objects.add(len(scene.objects))
        for k, o in enumerate(scene.objects):
            longer = max(o.box[2] - o.box[0], o.box[3] - o.box[1]) / 128
            lo, hi = (0.12, 0.20) if o.size == "small" else (0.28, 0.40)
            assert lo <= longer <= hi, o
            assert min(o.box[:2]) >= 1 and max(o.box[2:]) <= 127  # off the canvas edge
            sizes[o.size] += 1
            kinds.add((o.shape, o.color))
            for other in scene.objects[k + 1 :]:
                assert _iou(o.box, other.box) <= 0.1
    assert n_objects == {1, 2, 3, 4, 5, 6}
    assert len(kinds) == len(SHAPES) * len(COLORS)
    assert 0.4 < sizes["small"] / sum(sizes.values()) < 0.6


def test_circles_are_round_and_triangles_point_up():
    for w in (8, 15, 16, 25, 51):
        circle = shape_mask("circle", w, w)
        assert (circle == circle.T).all() and (circle == circle[::-1]).all()
        tri = shape_mask("triangle", w, w)
        assert tri[-1].all() and tri[0].sum() <= 2  # full base, one- or two-pixel apex
        assert (tri == tri[:, ::-1]).all()
    assert shape_mask("rectangle", 7, 3).all()


def test_same_seed_same_bytes(tmp_path):
    a = write_split(tmp_path / "a", "train", 6, size=64, seed=5, noise=0.02, progress=False)
    b = write_split(tmp_path / "b", "train", 6, size=64, seed=5, noise=0.02, progress=False)
    assert a.read_bytes() == b.read_bytes()
    for i in range(6):
        name = f"images/train_{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = write_split(tmp_path / "c", "train", 6, size=64, seed=6, noise=0.02, progress=False)
    assert c.read_bytes() != a.read_bytes()


def test_written_split_is_complete_and_each_image_reproducible_alone(tmp_path):
    path = write_split(tmp_path, "val", 8, size=96, seed=3, progress=False)
    assert path == tmp_path / "val.jsonl"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "val.jsonl"]  # no .tmp
    records = load_records(tmp_path, "val")
    assert [r["id"] for r in records] == [f"val_{i:06d}" for i in range(8)]
    for i in (0, 5):
        record = records[i]
        scene = generate_scene(split_rng(3, "val", i), size=96)
        assert [o["box"] for o in record["objects"]] == [list(o.box) for o in scene.objects]
        assert record["source"] == "shapes" and (record["width"], record["height"]) == (96, 96)
        assert np.array_equal(np.asarray(load_image(tmp_path, record)), np.asarray(render(scene)))


def _hashes(split: str, n: int) -> list[str]:
    return [
        hashlib.sha256(
            render(generate_scene(split_rng(0, split, i), size=64)).tobytes()
        ).hexdigest()
        for i in range(n)
    ]


def test_splits_differ_and_no_test_image_equals_a_train_image():
    train, test, val = _hashes("train", 300), _hashes("test", 300), _hashes("val", 50)
    assert len(set(train)) == 300 and len(set(test)) == 300
    assert not set(train) & set(test)
    assert not set(val) & (set(train) | set(test))


def test_noise_is_mild_and_seeded():
    scene = generate_scene(np.random.default_rng(1), noise=0.03)
    clean = np.asarray(render(scene_from_objects(scene.objects, 128, scene.background)), float)
    noisy = np.asarray(render(scene, np.random.default_rng(2)), float)
    again = np.asarray(render(scene, np.random.default_rng(2)), float)
    assert np.array_equal(noisy, again)
    assert 2.0 < np.abs(noisy - clean).mean() < 10.0


def test_scene_from_objects_draws_what_it_is_given():
    objects = [
        ShapeObject("circle", "red", "small", (10, 10, 30, 30)),
        {"shape": "triangle", "color": "blue", "box": [60, 20, 110, 60]},  # size from box
    ]
    scene = scene_from_objects(objects, size=128, background=(250, 240, 230))
    assert [o.size for o in scene.objects] == ["small", "large"]
    pixels = np.asarray(render(scene))
    assert tuple(pixels[20, 20]) == (255, 0, 0)
    assert tuple(pixels[55, 85]) == (0, 0, 255)
    assert tuple(pixels[21, 61]) == (250, 240, 230)  # triangle's empty top-left corner
    _check_scene_pixels(scene, pixels)
    with pytest.raises(ValueError):
        scene_from_objects([{"shape": "circle", "color": "red", "box": [120, 0, 140, 20]}])
    with pytest.raises(ValueError):
        scene_from_objects([{"shape": "hexagon", "color": "red", "box": [0, 0, 20, 20]}])
