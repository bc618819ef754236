"""Hard and random negatives are false for their scene and differ from the truth in one thing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from service.data.shapes import ShapeObject, generate_scene, scene_record, split_rng
from service.training.negatives import (
    NEGATIVE_KINDS,
    caption_holds,
    hard_negatives,
    parse_caption,
    random_negative,
    render_caption,
    sample_hard_negative,
    turned_question,
)


def _records(n: int, split: str = "val") -> list[dict]:
    out = []
    for i in range(n):
        rng = split_rng(7, split, i)
        out.append(scene_record(generate_scene(rng, size=96), rng, "x.png", f"{split}_{i}"))
    return out


RECORDS = _records(60)


def _objects(c) -> Counter:
    """The multiset of (description) slots a parsed listing names."""
    out: Counter = Counter()
    for d, n in c.groups:
        out[d] += n
    return out


def _one_change(truth, neg, kind: str) -> bool:
    """Whether the parsed negative differs from the parsed truth in exactly one thing."""
    a, b = _objects(truth), _objects(neg)
    if kind == "relation":
        return a == b and truth.relation.relation != neg.relation.relation
    if truth.relation and neg.relation and truth.relation.relation != neg.relation.relation:
        return False
    if kind == "count":
        diff = (a - b) + (b - a)
        return sum(diff.values()) == 1 and a.keys() | b.keys() == a.keys()
    removed, added = a - b, b - a
    if sum(removed.values()) != 1 or sum(added.values()) != 1:
        return False
    (old,), (new,) = removed, added
    slot = {"size": 0, "color": 1, "shape": 2}[kind]
    return [k for k in range(3) if old[k] != new[k]] == [slot]


def test_every_caption_parses_back_and_holds_for_its_scene():
    for r in RECORDS:
        for text in r["captions"]:
            assert render_caption(parse_caption(text)) == text
            assert caption_holds(text, r["objects"]), text


def test_hard_negatives_are_false_and_change_one_thing():
    seen = Counter()
    for r in RECORDS:
        truth_text = r["captions"][0]
        truth = parse_caption(truth_text)
        for neg in hard_negatives(truth_text, r["objects"]):
            seen[neg.kind] += 1
            assert not caption_holds(neg.text, r["objects"]), neg
            assert _one_change(truth, parse_caption(neg.text), neg.kind), (truth_text, neg)
    assert set(seen) == set(NEGATIVE_KINDS), seen  # each kind occurs on a realistic sample


def test_hand_made_scene_negatives():
    # a red circle left of a blue triangle, both small
    objects = [
        ShapeObject("circle", "red", "small", (10, 40, 30, 60)),
        ShapeObject("triangle", "blue", "small", (60, 40, 80, 60)),
    ]
    truth = (
        "a small red circle and a small blue triangle. "
        "the small red circle is left of the small blue triangle"
    )
    assert caption_holds(truth, objects)
    texts = {n.text: n.kind for n in hard_negatives(truth, objects)}
    swapped = truth.replace("is left of", "is right of")
    assert texts[swapped] == "relation"
    recoloured = truth.replace("red", "green")  # the listing and the relation both rename it
    assert texts[recoloured] == "color"
    assert texts[truth.replace("a small blue triangle.", "two small blue triangles.")] == "count"
    red_triangle = (
        "a small red circle and a small red triangle. "
        "the small red circle is left of the small red triangle"
    )
    assert texts[red_triangle] == "color"
    assert truth not in texts


def test_relation_swap_is_dropped_where_it_would_be_true():
    # two identical circles on either side of a square: "a circle is left of a rectangle"
    # and its swap are both true, so the swap is no negative
    objects = [
        ShapeObject("circle", "red", "small", (0, 0, 10, 10)),
        ShapeObject("rectangle", "blue", "small", (40, 0, 50, 10)),
        ShapeObject("circle", "red", "small", (80, 0, 90, 10)),
    ]
    text = (
        "two small red circles and a small blue rectangle. "
        "a small red circle is left of a small blue rectangle"
    )
    assert caption_holds(text, objects)
    kinds = {n.kind for n in hard_negatives(text, objects)}
    assert "relation" not in kinds
    assert {"color", "size", "shape", "count"} <= kinds


def test_sample_hard_negative_spreads_over_kinds():
    rng = np.random.default_rng(0)
    r = next(r for r in RECORDS if parse_caption(r["captions"][0]).relation)
    kinds = Counter(
        sample_hard_negative(r["captions"][0], r["objects"], rng).kind for _ in range(500)
    )
    assert set(kinds) == set(NEGATIVE_KINDS)
    # kinds drawn uniformly: relation (one variant) as often as colour (many variants)
    assert min(kinds.values()) > 500 / len(NEGATIVE_KINDS) * 0.6, kinds


def test_random_negatives_are_false_for_the_image():
    rng = np.random.default_rng(1)
    pool = [c for r in RECORDS for c in r["captions"]]
    for r in RECORDS[:30]:
        others = [c for c in pool if c not in r["captions"]]
        neg = random_negative(r["objects"], others, rng)
        assert neg is not None and neg.kind == "random"
        assert not caption_holds(neg.text, r["objects"])


def test_random_negative_gives_up_when_every_candidate_is_true():
    r = RECORDS[0]
    assert random_negative(r["objects"], r["captions"], np.random.default_rng(0)) is None


@pytest.mark.parametrize(
    "text", ["a purple circle", "three", "the red circle is near the blue square", ""]
)
def test_unreadable_captions_raise(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_a_complete_captions_relation_sentence_alone_reads_as_its_relation():
    """As `/v1/match` checks a text by sentence: "the X is left of the Y" alone parses back
    to itself, holds for the scene, and its twin (the relation turned) is false."""
    seen = 0
    for r in RECORDS:
        _, _, sentence = r["captions"][0].partition(". ")
        if not sentence:
            continue
        seen += 1
        c = parse_caption(sentence)
        assert c.groups == () and c.relation.copula and render_caption(c) == sentence
        assert caption_holds(sentence, r["objects"])
        for neg in hard_negatives(sentence, r["objects"]):
            assert neg.kind == "relation" and not caption_holds(neg.text, r["objects"])
            assert parse_caption(neg.text).relation.relation != c.relation.relation
    assert seen > 10


def test_turned_question_turns_the_relation_and_its_answer():
    objects = [
        ShapeObject("circle", "red", "small", (0, 0, 10, 10)),
        ShapeObject("rectangle", "blue", "large", (40, 30, 70, 60)),
        ShapeObject("circle", "green", "small", (55, 0, 65, 10)),  # above the rectangle
    ]
    assert turned_question("is the red circle left of the large rectangle?", objects) == (
        "is the red circle right of the large rectangle?",
        "no",
    )
    assert turned_question("is the blue shape located above the red shape?", objects) == (
        "is the blue shape located below the red shape?",
        "yes",
    )
    # the green circle overlaps the rectangle, its centre right of the rectangle's:
    # not left of it, but not clearly right of it either
    assert turned_question("is the green circle left of the rectangle?", objects) is None
    # "circle" names two objects; not a yes/no relation question; no such object; no shape
    assert turned_question("is the circle left of the rectangle?", objects) is None
    assert turned_question("what color is the circle left of the rectangle?", objects) is None
    assert turned_question("is the purple circle left of the rectangle?", objects) is None
    assert turned_question("is the purple square left of the rectangle?", objects) is None


def test_turned_questions_of_generated_scenes_flip_the_generators_answer():
    turned = 0
    for r in _records(200, "train"):
        for q in r["questions"]:
            if q["family"] != "relation" or q["answer"] not in ("yes", "no"):
                continue
            twin = turned_question(q["question"], r["objects"])
            if twin is not None:
                turned += 1
                other = "yes" if q["answer"] == "no" else "no"
                # the only answers that stay are boxes with equal centres on the axis
                assert twin[1] == other or q["answer"] == "no", (q, twin)
            elif q["answer"] == "yes":
                raise AssertionError(f"a relation that holds must turn: {q}")
    assert turned > 20
