"""Questions, referring expressions and captions checked by an independent oracle.

The oracle below parses the generated English with its own grammar and vocabulary and
recomputes every answer from the scene's annotations alone; it shares no code with
service.data.language.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from service.data.language import ANSWERS, FAMILIES, captions, questions, refexps
from service.data.shapes import generate_scene, scene_from_objects, split_rng

SIZE_WORDS = ["small", "large"]
COLOR_WORDS = ["red", "green", "blue", "yellow", "black", "gray", "teal", "brown"]
SHAPE_WORDS = ["circle", "rectangle", "triangle"]
NUMBERS = {"a": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
REL = r"(?P<rel>left of|right of|above|below)"


# ------------------------------------------------------------------ the oracle


def parse_desc(text: str) -> dict:
    """'small red circle' -> {'size': 'small', 'color': 'red', 'shape': 'circle'}."""
    words = text.split()
    noun = words.pop()
    assert noun in SHAPE_WORDS + ["shape"], text
    desc = {} if noun == "shape" else {"shape": noun}
    for w in words:
        key = "size" if w in SIZE_WORDS else "color" if w in COLOR_WORDS else None
        assert key and key not in desc, f"bad description {text!r}"
        desc[key] = w
    return desc


def fits(obj: dict, desc: dict) -> bool:
    return all(obj[k] == v for k, v in desc.items())


def strictly(a, b, rel: str) -> bool:
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a, b
    return {"left of": ax2 < bx1, "right of": bx2 < ax1, "above": ay2 < by1, "below": by2 < ay1}[
        rel
    ]


def in_doubt(a, b, rel: str) -> bool:
    """Not strictly so, yet a's centre lies on that side of b's centre."""
    if strictly(a, b, rel):
        return False
    dx = (a[0] + a[2]) - (b[0] + b[2])
    dy = (a[1] + a[3]) - (b[1] + b[3])
    return {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[rel]


def resolve(objects: list[dict], ref: str) -> list[int]:
    """Indices the reference (without 'the') picks out; relations need a unique anchor."""
    m = re.fullmatch(rf"(?P<t>[a-z ]+?) {REL} the (?P<a>[a-z ]+)", ref)
    if not m:
        return [i for i, o in enumerate(objects) if fits(o, parse_desc(ref))]
    anchors = resolve(objects, m["a"])
    assert len(anchors) == 1, f"anchor of {ref!r} is not unique"
    a, rel, desc = anchors[0], m["rel"], parse_desc(m["t"])
    group = [i for i, o in enumerate(objects) if i != a and fits(o, desc)]
    for i in group:
        assert not in_doubt(objects[i]["box"], objects[a]["box"], rel), f"{ref!r} is in doubt"
    return [i for i in group if strictly(objects[i]["box"], objects[a]["box"], rel)]


def the_one(objects: list[dict], ref: str) -> dict:
    found = resolve(objects, ref)
    assert len(found) == 1, f"{ref!r} picks out {found}"
    return objects[found[0]]


def yes(b: bool) -> str:
    return "yes" if b else "no"


def answer(objects: list[dict], question: str) -> tuple[str, str]:
    """(answer, family) of a question, from the annotations alone."""
    q = question.removesuffix("?")
    assert q != question, "a question ends with '?'"
    fam = "relation" if re.search(REL, q) else None

    def count(ref: str) -> str:
        return str(len(resolve(objects, ref)))

    def attr(ref: str, key: str, family: str) -> tuple[str, str]:
        return the_one(objects, ref)[key], fam or family

    rules = [
        (
            r"is the (?P<r>.+) (small or large|large or small)",
            lambda m: attr(m["r"], "size", "size"),
        ),
        (r"(what size is|how big is) the (?P<r>.+)", lambda m: attr(m["r"], "size", "size")),
        (
            r"(what color is|what is the color of|which color is) the (?P<r>.+)",
            lambda m: attr(m["r"], "color", "color"),
        ),
        (r"what color does the (?P<r>.+) have", lambda m: attr(m["r"], "color", "color")),
        (
            r"what shape (is in the image|does the image contain|is present)",
            lambda m: (the_one(objects, "shape")["shape"], "shape"),
        ),
        (
            r"what shape is the (?P<adj>[a-z ]+) one",
            lambda m: attr(m["adj"] + " shape", "shape", "shape"),
        ),
        (r"what kind of shape is the (?P<r>.+)", lambda m: attr(m["r"], "shape", "shape")),
        (
            rf"what shape is {REL} the (?P<a>.+)",
            lambda m: attr(f"shape {m['rel']} the {m['a']}", "shape", "shape"),
        ),
        (r"what is the number of (?P<d>[a-z ]+?)s", lambda m: (count(m["d"]), "count")),
        (
            rf"what is the number of (?P<d>[a-z ]+?)s {REL} the (?P<a>.+)",
            lambda m: (count(f"{m['d']} {m['rel']} the {m['a']}"), "relation"),
        ),
        (r"what is the (?P<r>.+)", lambda m: attr(m["r"], "shape", "shape")),
        (
            r"how many (?P<d>[a-z ]+?)s (are there|are in the image|does the image contain)",
            lambda m: (count(m["d"]), "count"),
        ),
        (
            rf"how many (?P<d>[a-z ]+?)s are {REL} the (?P<a>.+)",
            lambda m: (count(f"{m['d']} {m['rel']} the {m['a']}"), "relation"),
        ),
        (
            rf"is the (?P<p>[a-z ]+?) (located )?{REL} the (?P<q>[a-z ]+)",
            lambda m: (
                yes(
                    strictly(
                        the_one(objects, m["p"])["box"], the_one(objects, m["q"])["box"], m["rel"]
                    )
                )
                if not in_doubt(
                    the_one(objects, m["p"])["box"], the_one(objects, m["q"])["box"], m["rel"]
                )
                else "IN DOUBT",
                "relation",
            ),
        ),
        (r"(is there not|does the image not contain) an? (?P<d>[a-z ]+?)( in the image)?", None),
        (r"is no (?P<d>[a-z ]+) present", None),
        (
            r"(is there|does the image contain|can you see) an? (?P<d>[a-z ]+?)( in the image)?",
            True,
        ),
        (r"is an? (?P<d>[a-z ]+) present", True),
    ]
    for pattern, rule in rules:
        m = re.fullmatch(pattern, q)
        if not m:
            continue
        if rule is None or rule is True:  # exist: positive (True) or negated (None)
            present = bool(resolve(objects, m["d"]))
            return yes(present if rule else not present), "exist"
        return rule(m)
    raise AssertionError(f"the oracle cannot parse {question!r}")


def scene_dicts(scene) -> list[dict]:
    return [
        {"box": o.box, "shape": o.shape, "color": o.color, "size": o.size} for o in scene.objects
    ]


def listing(text: str, keys: tuple[str, ...]) -> Counter:
    """'two red circles, a blue triangle and a green shape' -> Counter of attribute tuples."""
    out = Counter()
    for part in re.split(r", | and ", text):
        number, rest = part.split(" ", 1)
        k = NUMBERS[number]
        if k > 1:
            rest = rest.removesuffix("s")
        d = parse_desc(rest)
        out[tuple(d.get(key) for key in keys)] += k
    return out


def objects_by(objects: list[dict], keys: tuple[str, ...]) -> Counter:
    return Counter(tuple(o[k] for k in keys) for o in objects)


# ------------------------------------------------------------------ data


def sample(n: int = 300, seed: int = 11):
    for i in range(n):
        rng = split_rng(seed, "train", i)
        scene = generate_scene(rng)
        yield scene, captions(scene, rng), questions(scene, rng), refexps(scene, rng)


@pytest.fixture(scope="module")
def corpus():
    return list(sample())


# ------------------------------------------------------------------ tests


def test_answer_vocabulary_contains_easy_vqa_and_is_ordered():
    easy = ["circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow"]
    easy += ["triangle", "brown", "blue", "no"]
    assert set(easy) <= set(ANSWERS) and len(set(ANSWERS)) == len(ANSWERS) == 22
    assert ANSWERS[:9] == ("yes", "no", "0", "1", "2", "3", "4", "5", "6")
    assert FAMILIES == ("exist", "count", "color", "shape", "size", "relation")


def test_every_answer_equals_the_oracles(corpus):
    by_family = Counter()
    for scene, _, qs, _ in corpus:
        objects = scene_dicts(scene)
        assert 6 <= len(qs) <= 10
        assert len({q["question"] for q in qs}) == len(qs)
        for q in qs:
            expected, family = answer(objects, q["question"])
            assert (q["answer"], q["family"]) == (expected, family), q
            assert q["answer"] in ANSWERS
            by_family[family] += 1
    assert set(by_family) == set(FAMILIES)


def test_families_and_answers_are_balanced(corpus):
    qs = [q for _, _, qs, _ in corpus for q in qs]
    families = Counter(q["family"] for q in qs)
    assert min(families.values()) / len(qs) > 0.1
    for family in ("exist", "relation"):
        yn = Counter(
            q["answer"] for q in qs if q["family"] == family and q["answer"] in ("yes", "no")
        )
        assert 0.4 < yn["yes"] / (yn["yes"] + yn["no"]) < 0.6, (family, yn)
    negated = [q for q in qs if q["family"] == "exist" and " not " in f" {q['question']} "]
    assert 0.2 < len(negated) / families["exist"] < 0.5
    counts = Counter(q["answer"] for q in qs if q["family"] == "count")
    assert set(counts) == {"0", "1", "2", "3", "4", "5", "6"}
    assert counts["1"] / sum(counts.values()) < 0.5
    for family, vocab in (("color", 8), ("shape", 3), ("size", 2)):
        got = Counter(q["answer"] for q in qs if q["family"] == family)
        assert len(got) == vocab and max(got.values()) / min(got.values()) < 2.0, got
    relations = Counter(
        re.search(REL, q["question"])["rel"] for q in qs if q["family"] == "relation"
    )
    assert len(relations) == 4 and max(relations.values()) / min(relations.values()) < 1.6


def test_every_referring_expression_picks_out_its_object(corpus):
    relational = named = total = 0
    for scene, _, _, refs in corpus:
        objects = scene_dicts(scene)
        for r in refs:
            assert r["expression"].startswith("the ")
            assert resolve(objects, r["expression"][4:]) == [r["index"]], r
            relational += bool(re.search(REL, r["expression"]))
        named += len({r["index"] for r in refs})
        total += len(objects)
    # An object is left unnamed only when no description or clear relation singles it out.
    assert named / total > 0.95
    assert relational > 200


def test_captions_name_every_object_and_say_only_true_things(corpus):
    for scene, caps, _, _ in corpus:
        objects = scene_dicts(scene)
        assert len(caps) >= 3 and len(set(caps)) == len(caps)
        first, *relation = caps[0].split(". ")
        assert listing(first, ("size", "color", "shape")) == objects_by(
            objects, ("size", "color", "shape")
        )
        if len(objects) >= 2:
            m = re.fullmatch(
                rf"(the|a) (?P<p>[a-z ]+) is {REL} (the|a) (?P<q>[a-z ]+)", relation[0]
            )
            assert m, caps[0]
            ps, qs_ = resolve(objects, m["p"]), resolve(objects, m["q"])
            assert any(
                strictly(objects[i]["box"], objects[j]["box"], m["rel"]) for i in ps for j in qs_
            )
        for cap in caps[1:]:
            if m := re.fullmatch(r"(\w+) shapes? on a pastel background", cap):
                assert NUMBERS.get(m[1], 0) == len(objects)
            elif m := re.fullmatch(rf"an? (?P<p>[a-z ]+) {REL} an? (?P<q>[a-z ]+)", cap):
                ps, qs_ = resolve(objects, m["p"]), resolve(objects, m["q"])
                assert any(
                    strictly(objects[i]["box"], objects[j]["box"], m["rel"])
                    for i in ps
                    for j in qs_
                )
            else:
                said = listing(cap, ("size", "color", "shape"))
                keys = tuple(
                    k
                    for k, v in zip(("size", "color", "shape"), next(iter(said)), strict=True)
                    if v
                )
                assert listing(cap, keys) == objects_by(objects, keys), cap


def test_identical_objects_are_only_named_through_relations():
    twins = [
        {"shape": "circle", "color": "red", "box": [10, 50, 30, 70]},
        {"shape": "rectangle", "color": "blue", "box": [50, 48, 74, 72]},
        {"shape": "circle", "color": "red", "box": [94, 50, 114, 70]},
    ]
    scene = scene_from_objects(twins)
    objects = scene_dicts(scene)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        refs = refexps(scene, rng)
        assert {r["index"] for r in refs} == {0, 1, 2}
        for r in refs:
            assert resolve(objects, r["expression"][4:]) == [r["index"]]
        for q in questions(scene, rng):
            assert answer(objects, q["question"]) == (q["answer"], q["family"])


def test_relations_in_doubt_are_never_used():
    # The boxes overlap along x and the triangle's centre is left of the rectangle's: "the
    # triangle is left of the rectangle" is in doubt, while "right of" clearly fails.
    doubt = [
        {"shape": "triangle", "color": "green", "box": [10, 10, 46, 46]},
        {"shape": "rectangle", "color": "black", "box": [40, 70, 76, 100]},
    ]
    scene = scene_from_objects(doubt)
    objects = scene_dicts(scene)
    horizontal = Counter()
    for seed in range(30):
        rng = np.random.default_rng(seed)
        for q in questions(scene, rng):
            assert answer(objects, q["question"]) == (q["answer"], q["family"]), q
            if m := re.search(r"(left|right) of", q["question"]):
                horizontal[m[1], q["answer"]] += 1
        for r in refexps(scene, rng):
            assert resolve(objects, r["expression"][4:]) == [r["index"]]
            assert not re.search(r"(left|right) of", r["expression"])
    # Asked only where the answer is a clear no (or a count of zero).
    assert horizontal and {a for _, a in horizontal} <= {"no", "0"}
