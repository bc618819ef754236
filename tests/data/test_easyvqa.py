"""easy-VQA records: boxes from pixels, attributes from questions, the package's counts."""

import io
import json
import random
from pathlib import Path

import easy_vqa
import numpy as np
import pytest
from PIL import Image, ImageDraw

from service.data.easyvqa import EASYVQA_ANSWERS, derive_box, load_split

# easy-VQA's colours (the generator's RGB values); the test's own copy.
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
# Non-background, defined here independently of derive_box: a pixel whose largest channel
# difference from the modal border colour exceeds 16 of 255.
NON_BACKGROUND = 16


@pytest.fixture(scope="module")
def splits():
    return {"train": load_split("train"), "test": load_split("test")}


def non_background_box(pixels):
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colours, counts = np.unique(border, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    mask = np.abs(pixels - background).max(axis=-1) > NON_BACKGROUND
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_derived_box_is_tight_around_every_non_background_pixel(splits):
    records = random.Random(0).sample(splits["train"] + splits["test"], 200)
    for r in records:
        pixels = np.asarray(Image.open(r["image"]).convert("RGB"), dtype=np.int16)
        x1, y1, x2, y2 = r["objects"][0]["box"]
        t1, u1, t2, u2 = non_background_box(pixels)
        assert x1 <= t1 and y1 <= u1 and x2 >= t2 and y2 >= u2, (r["id"], r["objects"][0])
        assert max(t1 - x1, u1 - y1, x2 - t2, y2 - u2) <= 2, (r["id"], r["objects"][0])


def test_records_cover_every_image_and_question_of_the_package(splits):
    for split, (texts, answers, image_ids) in (
        ("train", easy_vqa.get_train_questions()),
        ("test", easy_vqa.get_test_questions()),
    ):
        records = splits[split]
        assert len(records) == len(set(image_ids))
        assert sum(len(r["questions"]) for r in records) == len(texts)
        by_id = {r["id"]: r for r in records}
        first = by_id[f"easyvqa_{split}_{image_ids[0]:06d}"]["questions"][0]
        assert (first["question"], first["answer"]) == (texts[0], answers[0])
    assert len(splits["train"]) + len(splits["test"]) == 5000
    assert sum(len(r["questions"]) for s in splits.values() for r in s) == 48248


def test_record_format(splits):
    ids = set()
    for r in splits["train"][:50] + splits["test"][:50]:
        assert json.loads(json.dumps(r)) == r
        assert Path(r["image"]).is_absolute() and Path(r["image"]).is_file()
        assert (r["width"], r["height"], r["source"]) == (64, 64, "easy-vqa")
        assert r["captions"] == [] and r["refexps"] == [] and len(r["objects"]) == 1
        x1, y1, x2, y2 = r["objects"][0]["box"]
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
        ids.add(r["id"])
    assert len(ids) == 100


def test_answers_are_the_thirteen_and_families_follow_them(splits):
    assert list(EASYVQA_ANSWERS) == easy_vqa.get_answers()
    family = {"yes": "exist", "no": "exist", "circle": "shape", "triangle": "shape"}
    family |= {"rectangle": "shape"} | {c: "color" for c in RGB}
    for records in splits.values():
        for r in records:
            for q in r["questions"]:
                assert q["answer"] in EASYVQA_ANSWERS
                assert q["family"] == family[q["answer"]]


def answer(question: str, shape: str | None, color: str | None) -> str | None:
    """Answer an easy-VQA question about one object; None when it needs what is unknown."""
    if question.startswith(("what color", "what is the color")):
        return color
    if question.startswith("what shape") or (
        question.startswith("what is the") and question.endswith("shape?")
    ):
        return shape
    named = next(w for w in [*RGB, "circle", "rectangle", "triangle"] if f" {w}" in question)
    known = color if named in RGB else shape
    if known is None:
        return None
    negated = " not " in question or question.startswith("is no ")
    return "yes" if (named == known) != negated else "no"


def test_shape_and_colour_agree_with_every_question(splits):
    checked = 0
    for records in splits.values():
        for r in records:
            obj = r["objects"][0]
            for q in r["questions"]:
                expected = answer(q["question"], obj["shape"], obj["color"])
                if expected is not None:
                    assert expected == q["answer"], (r["id"], obj, q)
                    checked += 1
    assert checked > 0.9 * 48248
    objects = [r["objects"][0] for s in splits.values() for r in s]
    assert sum(o["shape"] is not None for o in objects) >= 0.95 * 5000
    assert sum(o["color"] is not None for o in objects) >= 0.9 * 5000


def test_derived_colour_is_the_colour_of_the_pixels(splits):
    for r in splits["test"][:200]:
        obj = r["objects"][0]
        if obj["color"] is None:
            continue
        x1, y1, x2, y2 = obj["box"]
        pixels = np.asarray(Image.open(r["image"]).convert("RGB"))[y1:y2, x1:x2].reshape(-1, 3)
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        inside = {tuple(int(v) for v in c): n for c, n in zip(colours, counts, strict=True)}
        assert inside.get(RGB[obj["color"]], 0) >= 4, (r["id"], obj)


def drawn(shape, box, size=64, background=(236, 226, 240), fill=(0, 128, 128)):
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    x1, y1, x2, y2 = box  # exclusive ends
    if shape == "rectangle":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    else:
        draw.polygon([(x1, y2 - 1), ((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1)], fill=fill)
    return img


@pytest.mark.parametrize("shape", ["rectangle", "triangle"])
def test_derive_box_on_drawn_shapes_including_one_cut_by_the_edge(shape):
    for box in [(10, 20, 31, 45), (0, 40, 25, 64), (5, 5, 60, 60)]:
        assert derive_box(drawn(shape, box)) == box


def test_derive_box_survives_jpeg_and_noise():
    box = (12, 9, 40, 33)
    img = drawn("rectangle", box, fill=(165, 42, 42))
    noisy = np.asarray(img, dtype=np.int16) + np.random.default_rng(0).integers(-6, 7, (64, 64, 3))
    noisy = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    for quality in (50, 75, 90):
        buf = io.BytesIO()
        noisy.save(buf, "JPEG", quality=quality)
        got = derive_box(Image.open(buf))
        assert max(abs(g - b) for g, b in zip(got, box, strict=True)) <= 2, (quality, got)


def test_blank_image_has_no_box():
    with pytest.raises(ValueError, match="no foreground"):
        derive_box(Image.new("RGB", (64, 64), (240, 230, 250)))


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="train"):
        load_split("val")
