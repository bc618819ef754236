"""A caption's claims, put as questions, are true of its scene, and every hard negative
states some claim the scene contradicts."""

from __future__ import annotations

from service.data.captions import (
    MAX_CLAIMS,
    claim_questions,
    expand_claim_questions,
    parse_desc,
)
from service.data.shapes import generate_scene, scene_record, split_rng
from service.training.negatives import caption_holds, hard_negatives


def _record(i: int) -> dict:
    rng = split_rng(3, "val", i)
    return scene_record(generate_scene(rng, size=96), rng, "x.png", f"val_{i}")


RECORDS = [_record(i) for i in range(60)]
SLOTS = ("size", "color", "shape")


def _count_is_true(question: str, answer: str, objects: list[dict]) -> bool:
    """'how many small red circles are there?' -> '2', checked against the objects."""
    d = parse_desc(question.removeprefix("how many ").removesuffix("s are there?"))
    fits = [
        o for o in objects if all(v is None or v == o.get(k) for v, k in zip(d, SLOTS, strict=True))
    ]
    return str(len(fits)) == answer


def test_every_claim_of_a_true_caption_holds_for_its_scene():
    asked = 0
    for record in RECORDS:
        objects = record["objects"]
        for caption in record["captions"]:
            for question, answer in claim_questions(caption):
                asked += 1
                if question.startswith("how many"):
                    assert _count_is_true(question, answer, objects), (caption, question)
                else:  # "is the X left of the Y?": the caption's relation, stated true
                    assert answer == "yes" and caption_holds(caption, objects)
    assert asked > 4 * len(RECORDS)


def test_every_hard_negative_states_a_claim_the_scene_contradicts():
    seen = set()
    for record in RECORDS:
        caption, objects = record["captions"][0], record["objects"]
        true_claims = set(claim_questions(caption))
        for negative in hard_negatives(caption, objects):
            claims = claim_questions(negative.text)
            assert claims and set(claims) != true_claims
            if negative.kind != "relation":  # a count the scene does not have
                counts = [(q, a) for q, a in claims if q.startswith("how many")]
                assert not all(_count_is_true(q, a, objects) for q, a in counts), negative
            seen.add(negative.kind)
    assert seen == {"color", "size", "shape", "count", "relation"}


def test_hand_made_claims():
    assert claim_questions("a small red circle, two blue rectangles and a green shape.") == [
        ("how many small red circles are there?", "1"),
        ("how many blue rectangles are there?", "2"),
        ("how many green shapes are there?", "1"),
        ("how many shapes are there?", "4"),
    ]
    assert claim_questions("The red circle is left of the blue rectangle") == [
        ("is the red circle left of the blue rectangle?", "yes")
    ]
    assert claim_questions("a red circle above a blue shape") == [
        ("is the red circle above the blue shape?", "yes")
    ]
    assert claim_questions("three shapes on a pastel background") == [
        ("how many shapes are there?", "3")
    ]
    for text in ("", "hello there", "a dog on a sofa", "seven purple circles"):
        assert claim_questions(text) == []


def test_expand_marks_answers_the_vocabulary_lacks_and_bounds_each_text():
    answers = ["yes", "no", "0", "1", "2", "3"]
    listing = ", ".join(["a red circle"] * 9) + " and a blue circle"  # 10 groups, 11 claims
    texts = [
        "two red circles and a blue circle. the blue circle is above the red circle",
        "nothing to read",
        "six shapes on a pastel background",
        listing,
    ]
    questions, expected, owner = expand_claim_questions(texts, answers)
    assert owner == [0, 0, 0, 0, 2, *[3] * MAX_CLAIMS]
    assert expected[:4] == [4, 3, 5, 0]  # "2", "1", "3", "yes"
    assert expected[4] == -1  # "6" is not among the answers
    assert questions[3] == "is the blue circle above the red circle?"
