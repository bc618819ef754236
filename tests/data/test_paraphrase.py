"""The paraphrase test set: every generator question reworded, same answer, unseen words."""

from __future__ import annotations

import numpy as np
import pytest

from service.data.language import FAMILIES
from service.data.paraphrase import (
    KINDS,
    NEW_WORDS,
    paraphrase,
    paraphrase_records,
    parse,
    training_texts,
    vocabulary,
    words,
)
from service.data.shapes import generate_scene, scene_record, split_rng


def _records(split: str, n: int) -> list[dict]:
    out = []
    for i in range(n):
        rng = split_rng(0, split, i)
        out.append(scene_record(generate_scene(rng, size=64), rng, f"{split}_{i}.png", str(i)))
    return out


@pytest.fixture(scope="module")
def splits():
    train, test = _records("train", 150), _records("test", 60)
    return train, test, paraphrase_records(test, train, seed=0)


def test_every_test_question_is_reworded_with_its_answer_and_family(splits):
    _, test, para = splits
    assert [r["id"] for r in para] == [r["id"] for r in test]
    pairs = [
        (q, p)
        for r, s in zip(test, para, strict=True)
        for q, p in zip(r["questions"], s["questions"], strict=True)
    ]
    assert len(pairs) == sum(len(r["questions"]) for r in test) > 300
    assert {q["family"] for q, _ in pairs} == set(FAMILIES)
    for q, p in pairs:
        assert p["original"] == q["question"] != p["question"]
        assert (p["answer"], p["family"]) == (q["answer"], q["family"])


def test_no_paraphrase_and_no_new_word_occurs_in_training(splits):
    train, _, para = splits
    texts = training_texts(train)
    vocab = vocabulary(texts)
    assert NEW_WORDS and not NEW_WORDS & vocab
    assert {"hue", "colour", "figure", "tiny", "huge", "count", "any"} <= NEW_WORDS
    for r in para:
        for q in r["questions"]:
            assert q["question"] not in texts
            assert NEW_WORDS & set(words(q["question"]))


def test_every_frame_brings_a_new_word_and_keeps_its_kinds_slots():
    for kind, (templates, frames) in KINDS.items():
        for frame in frames:
            bare = frame
            for slot in ("{a}", "{p}", "{ps}", "{adj}", "{rel}", "{q}"):
                bare = bare.replace(slot, " ")
            assert NEW_WORDS & set(words(bare)), frame
            assert ("{rel}" in frame) == ("{rel}" in templates[0]), (kind, frame)


@pytest.mark.parametrize(
    "question, allowed",
    [
        (
            "is there not a small gray circle?",
            {
                "is a tiny grey circle absent?",
                "is a tiny grey circle missing from the picture?",
                "does the picture lack a tiny grey circle?",
            },
        ),
        (
            "is no large shape present?",
            {
                "is a huge object absent?",
                "is a huge object missing from the picture?",
                "does the picture lack a huge object?",
            },
        ),
        (
            "how many red shapes are there?",
            {
                "count the red objects.",
                "how many red objects are visible?",
                "how many red objects can you spot?",
            },
        ),
        (
            "is the small circle left of the blue shape?",
            {
                "is the tiny circle situated to the left of the blue object?",
                "does the tiny circle sit to the left of the blue object?",
            },
        ),
        (
            "is the red triangle large or small?",
            {
                "is the red triangle tiny or huge?",
                "is the red triangle huge or tiny?",
                "tell me if the red triangle is tiny or huge.",
            },
        ),
    ],
)
def test_hand_made_rewordings(question, allowed):
    got = {paraphrase(question, np.random.default_rng(s)) for s in range(40)}
    assert got == allowed


def test_negations_and_relations_are_not_confused():
    assert parse("is there not a red circle?")[0] == "exist_not"
    assert parse("is there a red circle in the image?") == ("exist", {"a": "a red circle"})
    kind, slots = parse("what is the large shape below the teal circle?")
    assert kind == "rel_shape" and slots == {"adj": "large", "rel": "below", "q": "teal circle"}
    with pytest.raises(ValueError, match="no template"):
        parse("what hue is the circle?")


def test_a_training_split_that_uses_a_new_word_is_refused(splits):
    train, test, _ = splits
    leaky = [*train, {"captions": ["a tiny red circle"], "questions": [], "refexps": []}]
    with pytest.raises(ValueError, match="tiny"):
        paraphrase_records(test, leaky)
