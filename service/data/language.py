"""Captions, questions and referring expressions for shapes-world scenes.

Objects are named by a description: a subset of (size, colour, shape) read as a phrase
("small red circle", "red shape", "shape"). The generator refers to an object only
through a description that picks it out alone, or through "<description> <relation> the
<unique description>" when exactly one object matching the description stands in that
relation to the anchor.

Relations are strict: A is left of B iff A.x2 < B.x1, above iff A.y2 < B.y1 (boxes, ends
exclusive). A relation is used only where it holds or clearly fails; it is in doubt when
it does not hold yet A's centre lies on the asked side of B's centre (the boxes overlap
along that axis), and such pairs are never asked about nor used to single an object out.
"""

from __future__ import annotations

from itertools import product

import numpy as np

from service.data.shapes import COLORS, SHAPES, SIZES, Scene, ShapeObject

FAMILIES = ("exist", "count", "color", "shape", "size", "relation")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_ANSWERS = tuple(str(i) for i in range(7))
ANSWERS = ("yes", "no", *COUNT_ANSWERS, *COLORS, *SHAPES, *SIZES)
ATTRIBUTES = ("size", "color", "shape")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")

Desc = tuple[str | None, str | None, str | None]  # (size, colour, shape), None = unsaid
EMPTY: Desc = (None, None, None)
ALL_DESCS: list[Desc] = list(product((None, *SIZES), (None, *COLORS), (None, *SHAPES)))

EXIST_TEMPLATES = (
    "is there {a}?",
    "is there {a} in the image?",
    "does the image contain {a}?",
    "is {a} present?",
    "can you see {a}?",
)
EXIST_NOT_TEMPLATES = (
    "is there not {a}?",
    "is there not {a} in the image?",
    "does the image not contain {a}?",
    "is no {p} present?",
)
COUNT_TEMPLATES = (
    "how many {ps} are there?",
    "how many {ps} are in the image?",
    "how many {ps} does the image contain?",
    "what is the number of {ps}?",
)
COLOR_TEMPLATES = (
    "what color is the {p}?",
    "what is the color of the {p}?",
    "which color is the {p}?",
    "what color does the {p} have?",
)
SHAPE_TEMPLATES = (
    "what is the {adj} shape?",
    "what shape is the {adj} one?",
    "what kind of shape is the {adj} shape?",
)
SHAPE_ALONE_TEMPLATES = (  # the only object: easy-VQA's phrasings
    "what shape is in the image?",
    "what shape does the image contain?",
    "what shape is present?",
)
SIZE_TEMPLATES = (
    "what size is the {p}?",
    "is the {p} small or large?",
    "is the {p} large or small?",
    "how big is the {p}?",
)
REL_YESNO_TEMPLATES = ("is the {p} {rel} the {q}?", "is the {p} located {rel} the {q}?")
REL_COLOR_TEMPLATES = (
    "what color is the {p} {rel} the {q}?",
    "what is the color of the {p} {rel} the {q}?",
)
REL_SHAPE_TEMPLATES = ("what is the {adj} shape {rel} the {q}?",)
REL_SHAPE_ALONE_TEMPLATES = ("what shape is {rel} the {q}?", "what is the shape {rel} the {q}?")
REL_SIZE_TEMPLATES = (
    "what size is the {p} {rel} the {q}?",
    "is the {p} {rel} the {q} small or large?",
)
REL_COUNT_TEMPLATES = (
    "how many {ps} are {rel} the {q}?",
    "what is the number of {ps} {rel} the {q}?",
)


# ---------------------------------------------------------------- descriptions


def phrase(d: Desc) -> str:
    """'small red circle', 'red shape', 'shape'."""
    return " ".join(w for w in (d[0], d[1], d[2] or "shape") if w)


def plural(d: Desc) -> str:
    return phrase(d) + "s"


def adjectives(d: Desc) -> str:
    return " ".join(w for w in (d[0], d[1]) if w)


def with_article(text: str) -> str:
    return ("an " if text[0] in "aeiou" else "a ") + text


def full_desc(o: ShapeObject) -> Desc:
    return (o.size, o.color, o.shape)


def matches(o: ShapeObject, d: Desc) -> bool:
    return all(v is None or v == w for v, w in zip(d, full_desc(o), strict=True))


def sub_descs(o: ShapeObject, drop: str | None = None) -> list[Desc]:
    """The 8 descriptions that fit `o` (fewer when attribute `drop` is never said)."""
    keep = [
        (None, v) if a != drop else (None,) for a, v in zip(ATTRIBUTES, full_desc(o), strict=True)
    ]
    return list(product(*keep))


def _n_attrs(d: Desc) -> int:
    return sum(v is not None for v in d)


# ---------------------------------------------------------------- relations


def _centre(b) -> tuple[float, float]:
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def relation_holds(a, b, rel: str) -> bool:
    """Strict relation between boxes a and b: 'a is <rel> b'."""
    if rel == "left of":
        return a[2] < b[0]
    if rel == "right of":
        return b[2] < a[0]
    if rel == "above":
        return a[3] < b[1]
    if rel == "below":
        return b[3] < a[1]
    raise ValueError(rel)


def relation_clear(a, b, rel: str) -> bool:
    """True when 'a is <rel> b' holds or fails without doubt."""
    if relation_holds(a, b, rel):
        return True
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return {"left of": ax >= bx, "right of": ax <= bx, "above": ay >= by, "below": ay <= by}[rel]


class _Facts:
    """What the generator may say about one scene, computed once."""

    def __init__(self, scene: Scene):
        self.objects = scene.objects
        n = len(self.objects)
        self.match = {
            d: [i for i, o in enumerate(self.objects) if matches(o, d)] for d in ALL_DESCS
        }
        self.unique = [
            [d for d in sub_descs(o) if self.match[d] == [i]] for i, o in enumerate(self.objects)
        ]
        boxes = [o.box for o in self.objects]
        self.holds = {
            r: [[relation_holds(boxes[i], boxes[j], r) for j in range(n)] for i in range(n)]
            for r in RELATIONS
        }
        self.clear = {
            r: [[relation_clear(boxes[i], boxes[j], r) for j in range(n)] for i in range(n)]
            for r in RELATIONS
        }

    def unique_without(self, i: int, attr: str) -> list[Desc]:
        """Unique descriptions of object i that do not say `attr`."""
        return [d for d in self.unique[i] if d[ATTRIBUTES.index(attr)] is None]

    def picks(self, d: Desc, rel: str, anchor: int) -> list[int] | None:
        """Objects matching d that are <rel> the anchor; None when any is in doubt."""
        group = [o for o in self.match[d] if o != anchor]
        if not all(self.clear[rel][o][anchor] for o in group):
            return None
        return [o for o in group if self.holds[rel][o][anchor]]

    def relational(self, t: int, drop: str | None = None) -> list[tuple[Desc, str, int]]:
        """(description, relation, anchor) triples that single out object t."""
        out = []
        for a, rel in product(range(len(self.objects)), RELATIONS):
            if a == t or not self.unique[a] or not self.holds[rel][t][a]:
                continue
            for d in sub_descs(self.objects[t], drop):
                if self.picks(d, rel, a) == [t]:
                    out.append((d, rel, a))
        return out


def _pick(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


# ---------------------------------------------------------------- questions


def _q(question: str, answer: str, family: str) -> dict:
    return {"question": question, "answer": answer, "family": family}


def _ask_exist(f: _Facts, rng: np.random.Generator) -> dict | None:
    k = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    present = bool(rng.random() < 0.5)
    pool = [d for d in ALL_DESCS if _n_attrs(d) == k and bool(f.match[d]) == present]
    if not present and rng.random() < 0.5:
        # Binding negatives: each attribute is in the scene, only not on one object.
        hard = [d for d in pool if all(f.match[_only(d, a)] for a in range(3) if d[a])]
        pool = hard or pool
    if not pool:
        return None
    d = _pick(rng, pool)
    negated = bool(rng.random() < 0.35)
    template = _pick(rng, EXIST_NOT_TEMPLATES if negated else EXIST_TEMPLATES)
    text = template.format(a=with_article(phrase(d)), p=phrase(d))
    return _q(text, "yes" if present != negated else "no", "exist")


def _only(d: Desc, a: int) -> Desc:
    return tuple(v if k == a else None for k, v in enumerate(d))


def _ask_count(f: _Facts, rng: np.random.Generator) -> dict | None:
    if rng.random() < 0.15:
        d = EMPTY
    else:
        # Draw the answer first (zero 20% of the time, else uniform over the counts the
        # scene offers), then a description with that count: answers stay spread out.
        k = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
        by_count: dict[int, list[Desc]] = {}
        for d in ALL_DESCS:
            if _n_attrs(d) == k:
                by_count.setdefault(len(f.match[d]), []).append(d)
        positive = sorted(c for c in by_count if c > 0)
        count = 0 if rng.random() < 0.2 or not positive else _pick(rng, positive)
        if count not in by_count:
            return None
        d = _pick(rng, by_count[count])
    text = _pick(rng, COUNT_TEMPLATES).format(ps=plural(d))
    return _q(text, str(len(f.match[d])), "count")


def _target(f: _Facts, rng: np.random.Generator, attr: str) -> tuple[int, Desc] | None:
    """An object and a unique description of it that does not give `attr` away."""
    eligible = [i for i in range(len(f.objects)) if f.unique_without(i, attr)]
    if not eligible:
        return None
    i = _pick(rng, eligible)
    return i, _pick(rng, f.unique_without(i, attr))


def _ask_color(f: _Facts, rng: np.random.Generator) -> dict | None:
    if (t := _target(f, rng, "color")) is None:
        return None
    i, d = t
    return _q(_pick(rng, COLOR_TEMPLATES).format(p=phrase(d)), f.objects[i].color, "color")


def _ask_shape(f: _Facts, rng: np.random.Generator) -> dict | None:
    if (t := _target(f, rng, "shape")) is None:
        return None
    i, d = t
    adj = adjectives(d)
    text = _pick(rng, SHAPE_TEMPLATES).format(adj=adj) if adj else _pick(rng, SHAPE_ALONE_TEMPLATES)
    return _q(text, f.objects[i].shape, "shape")


def _ask_size(f: _Facts, rng: np.random.Generator) -> dict | None:
    if (t := _target(f, rng, "size")) is None:
        return None
    i, d = t
    return _q(_pick(rng, SIZE_TEMPLATES).format(p=phrase(d)), f.objects[i].size, "size")


def _ask_relation(f: _Facts, rng: np.random.Generator) -> dict | None:
    kind = _pick(rng, ("yesno", "yesno", "color", "shape", "size", "count"))
    if kind == "yesno":
        return _ask_rel_yesno(f, rng)
    if kind == "count":
        return _ask_rel_count(f, rng)
    return _ask_rel_attr(f, rng, kind)


def _ask_rel_yesno(f: _Facts, rng: np.random.Generator) -> dict | None:
    n = len(f.objects)
    pairs = [
        (i, j, r)
        for i, j, r in product(range(n), range(n), RELATIONS)
        if i != j and f.unique[i] and f.unique[j] and f.clear[r][i][j]
    ]
    want = bool(rng.random() < 0.5)
    pool = [p for p in pairs if f.holds[p[2]][p[0]][p[1]] == want] or pairs
    if not pool:
        return None
    i, j, r = _pick(rng, pool)
    p, q = phrase(_pick(rng, f.unique[i])), phrase(_pick(rng, f.unique[j]))
    text = _pick(rng, REL_YESNO_TEMPLATES).format(p=p, rel=r, q=q)
    return _q(text, "yes" if f.holds[r][i][j] else "no", "relation")


def _ask_rel_attr(f: _Facts, rng: np.random.Generator, attr: str) -> dict | None:
    cands = [(t, c) for t in range(len(f.objects)) for c in f.relational(t, drop=attr)]
    needed = [(t, c) for t, c in cands if f.match[c[0]] != [t]]  # relation is needed
    pool = needed if needed and rng.random() < 0.7 else cands
    if not pool:
        return None
    t, (d, rel, a) = _pick(rng, pool)
    q = phrase(_pick(rng, f.unique[a]))
    obj = f.objects[t]
    if attr == "color":
        text = _pick(rng, REL_COLOR_TEMPLATES).format(p=phrase(d), rel=rel, q=q)
    elif attr == "size":
        text = _pick(rng, REL_SIZE_TEMPLATES).format(p=phrase(d), rel=rel, q=q)
    elif adjectives(d):
        text = _pick(rng, REL_SHAPE_TEMPLATES).format(adj=adjectives(d), rel=rel, q=q)
    else:
        text = _pick(rng, REL_SHAPE_ALONE_TEMPLATES).format(rel=rel, q=q)
    return _q(text, getattr(obj, attr), "relation")


def _ask_rel_count(f: _Facts, rng: np.random.Generator) -> dict | None:
    anchors = [a for a in range(len(f.objects)) if f.unique[a]]
    if len(f.objects) < 2 or not anchors:
        return None
    a, rel = _pick(rng, anchors), _pick(rng, RELATIONS)
    descs = [EMPTY] + [d for o in f.objects for d in sub_descs(o) if 0 < _n_attrs(d) <= 2]
    # Count only what could be there besides the anchor, and only without doubt.
    descs = [
        d for d in dict.fromkeys(descs) if set(f.match[d]) - {a} and f.picks(d, rel, a) is not None
    ]
    if not descs:
        return None
    d = _pick(rng, descs)
    q = phrase(_pick(rng, f.unique[a]))
    text = _pick(rng, REL_COUNT_TEMPLATES).format(ps=plural(d), rel=rel, q=q)
    return _q(text, str(len(f.picks(d, rel, a))), "relation")


_ASK = {
    "exist": _ask_exist,
    "count": _ask_count,
    "color": _ask_color,
    "shape": _ask_shape,
    "size": _ask_size,
    "relation": _ask_relation,
}


def questions(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """6 to 10 distinct questions, families drawn uniformly among those that apply."""
    f = _Facts(scene)
    want = int(rng.integers(6, 11))
    out: list[dict] = []
    seen: set[str] = set()
    for _ in range(8 * want):
        if len(out) == want:
            break
        q = _ASK[_pick(rng, FAMILIES)](f, rng)
        if q is not None and q["question"] not in seen:
            seen.add(q["question"])
            out.append(q)
    return out


# ---------------------------------------------------------------- referring expressions


def refexps(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """Up to two expressions per object (one by attributes, one by relation) with its index."""
    f = _Facts(scene)
    out = []
    for i in range(len(f.objects)):
        if f.unique[i]:
            out.append({"expression": "the " + phrase(_pick(rng, f.unique[i])), "index": i})
        if rel := f.relational(i):
            needed = [c for c in rel if f.match[c[0]] != [i]]  # the relation is needed
            d, r, a = _pick(rng, needed if needed and rng.random() < 0.7 else rel)
            text = f"the {phrase(d)} {r} the {phrase(_pick(rng, f.unique[a]))}"
            out.append({"expression": text, "index": i})
    return out


# ---------------------------------------------------------------- captions


def _listing(objects: list[ShapeObject], keep: tuple[str, ...]) -> str:
    """'two red circles, a blue triangle and a green shape', grouped in order of appearance."""
    groups: dict[Desc, int] = {}
    for o in objects:
        d = tuple(v if a in keep else None for a, v in zip(ATTRIBUTES, full_desc(o), strict=True))
        groups[d] = groups.get(d, 0) + 1
    parts = [
        with_article(phrase(d)) if k == 1 else f"{NUMBER_WORDS[k]} {plural(d)}"
        for d, k in groups.items()
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _strict_pairs(f: _Facts) -> list[tuple[int, int, str]]:
    n = len(f.objects)
    return [(i, j, r) for i, j, r in product(range(n), range(n), RELATIONS) if f.holds[r][i][j]]


def _complete_caption(f: _Facts, ordered: list[ShapeObject], rng: np.random.Generator) -> str:
    text = _listing(ordered, ATTRIBUTES)
    pairs = _strict_pairs(f)
    if not pairs:
        return text
    named = [
        p
        for p in pairs
        if full_desc(f.objects[p[0]]) in f.unique[p[0]]
        and full_desc(f.objects[p[1]]) in f.unique[p[1]]
    ]
    i, j, r = _pick(rng, named or pairs)
    art = "the" if named else "a"
    a, b = phrase(full_desc(f.objects[i])), phrase(full_desc(f.objects[j]))
    return f"{text}. {art} {a} is {r} {art} {b}"


def captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """3 to 5 distinct captions; the first names every object with size, colour and shape."""
    f = _Facts(scene)
    ordered = sorted(scene.objects, key=lambda o: o.box[0] + o.box[2])  # left to right
    n = len(ordered)
    pool = [
        _listing(ordered, ("color", "shape")),
        _listing(ordered, ("size", "shape")),
        _listing(ordered, ("shape",)),
        _listing(ordered, ("color",)),
        f"{NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'} on a pastel background",
    ]
    if pairs := _strict_pairs(f):
        i, j, r = _pick(rng, pairs)
        a, b = (_pick(rng, sub_descs(f.objects[k], "size")[1:]) for k in (i, j))
        pool.append(f"{with_article(phrase(a))} {r} {with_article(phrase(b))}")
    complete = _complete_caption(f, ordered, rng)
    others = [c for c in dict.fromkeys(pool) if c != complete]
    chosen = rng.permutation(len(others))[: int(rng.integers(2, 5))]
    return [complete] + [others[k] for k in sorted(chosen)]
