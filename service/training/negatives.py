"""Negative captions for matching and retrieval: false for a scene, by construction and check.

A hard negative is the scene's complete caption (the first caption of a shapes-world
record) with exactly one thing changed:

    color, size, shape   one object's attribute takes another value
    count                one group of identical objects gains or loses one member
    relation             the stated relation turns to its opposite (left of <-> right of,
                         above <-> below)

The change is made on the parsed caption (`parse_caption`) and rendered back to text.
Every candidate is then checked against the objects by `caption_holds`, which reads the
text alone, and is kept only when that check finds it false. A random negative is
another image's caption that the same check finds false for this image.

How captions are read (the grammar of `service.data.language.captions`):

- A listing ("a small red circle, two large blue triangles and a green shape") names
  every object of the scene, grouped by the attributes it states: it holds when the
  objects, described by those attributes, are exactly the listed multiset.
- A relation ("the small red circle is left of the large blue triangle", or "a red
  circle above a blue shape") holds when some object matching the first description
  stands in that strict relation to another object matching the second.
- "<n> shapes on a pastel background" holds when the scene has n objects.
- A complete caption's relation sentence alone ("the small red circle is left of the
  large blue triangle", as `/v1/match` checks it by sentence) reads as that relation.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from service.data.captions import Caption, Desc, Relation, parse_caption, parse_desc, render_caption
from service.data.language import (
    NUMBER_WORDS,
    RELATIONS,
    relation_clear,
    relation_holds,
)
from service.data.shapes import COLORS, SHAPES, SIZES, ShapeObject

NEGATIVE_KINDS = ("color", "size", "shape", "count", "relation")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
ATTRIBUTE_VALUES = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES}
_SLOT = {"size": 0, "color": 1, "shape": 2}
_REL = "|".join(RELATIONS)
_RELATION_QUESTION = re.compile(rf"^is the (.+?) ((?:located )?)({_REL}) the (.+)\?$")


@dataclass(frozen=True)
class Negative:
    text: str
    kind: str  # one of NEGATIVE_KINDS, or "random"


# ---------------------------------------------------------------- truth


def _as_object(o: ShapeObject | dict) -> ShapeObject:
    if isinstance(o, ShapeObject):
        return o
    return ShapeObject(o["shape"], o["color"], o.get("size"), tuple(o["box"]))


def _fits(o: ShapeObject, d: Desc) -> bool:
    return all(v is None or v == w for v, w in zip(d, (o.size, o.color, o.shape), strict=True))


def _project(o: ShapeObject, slots: set[int]) -> Desc:
    full = (o.size, o.color, o.shape)
    return tuple(full[k] if k in slots else None for k in range(3))


def _listing_holds(groups: Sequence[tuple[Desc, int]], objects: list[ShapeObject]) -> bool:
    said = {k for d, _ in groups for k in range(3) if d[k] is not None}
    listed: Counter = Counter()
    for d, n in groups:
        listed[d] += n
    return listed == Counter(_project(o, said) for o in objects)


def _relation_holds(r: Relation, objects: list[ShapeObject]) -> bool:
    return any(
        a is not b
        and _fits(a, r.subject)
        and _fits(b, r.object)
        and relation_holds(a.box, b.box, r.relation)
        for a in objects
        for b in objects
    )


def caption_holds(text: str, objects: Sequence[ShapeObject | dict]) -> bool:
    """Whether a caption is true of the objects (records' dicts or ShapeObjects).

    Reads the text alone (nothing of how it was made), with the semantics in the module
    docstring; a listing must name every object, so it fails when an object is missing.
    """
    c = parse_caption(text)
    objs = [_as_object(o) for o in objects]
    if c.total is not None:
        return len(objs) == c.total
    if c.groups and not _listing_holds(c.groups, objs):
        return False
    return c.relation is None or _relation_holds(c.relation, objs)


def turned_question(question: str, objects: Sequence[ShapeObject | dict]) -> tuple[str, str] | None:
    """A yes/no relation question ("is the red circle left of the blue square?") with its
    relation turned to the opposite, and the turned question's answer for `objects`.

    None when the text is not such a question, a description does not pick out exactly
    one object, or the turned relation is in doubt (boxes overlapping on its axis), as the
    generator never asks those.
    """
    m = _RELATION_QUESTION.match(question)
    if m is None:
        return None
    p, located, rel, q = m.groups()
    objs = [_as_object(o) for o in objects]
    try:
        pick = [[o for o in objs if _fits(o, parse_desc(d))] for d in (p, q)]
    except ValueError:
        return None
    if any(len(found) != 1 for found in pick) or pick[0][0] is pick[1][0]:
        return None
    a, b, turned = pick[0][0].box, pick[1][0].box, OPPOSITE[rel]
    if not relation_clear(a, b, turned):
        return None
    answer = "yes" if relation_holds(a, b, turned) else "no"
    return f"is the {p} {located}{turned} the {q}?", answer


# ---------------------------------------------------------------- hard negatives


def _with_desc(d: Desc, attr: str, value: str) -> Desc:
    out = list(d)
    out[_SLOT[attr]] = value
    return tuple(out)


def _change_attribute(c: Caption, attr: str) -> list[Caption]:
    """One object of one group takes another value of `attr` (only where the caption says it)."""
    out = []
    for g, (d, n) in enumerate(c.groups):
        old = d[_SLOT[attr]]
        if old is None:
            continue
        for value in ATTRIBUTE_VALUES[attr]:
            if value == old:
                continue
            new = _with_desc(d, attr, value)
            changed = [(d, n - 1), (new, 1)] if n > 1 else [(new, 1)]
            groups = [*c.groups[:g], *changed, *c.groups[g + 1 :]]
            rel = c.relation
            if rel is not None and n == 1:  # the relation names that object: rename it there
                rel = replace(
                    rel,
                    subject=new if rel.subject == d else rel.subject,
                    object=new if rel.object == d else rel.object,
                )
            out.append(_merged(replace(c, groups=tuple(groups), relation=rel)))
    return out


def _merged(c: Caption) -> Caption:
    """Merge groups with equal descriptions (first appearance order), as captions group."""
    counts: dict[Desc, int] = {}
    for d, n in c.groups:
        if n:
            counts[d] = counts.get(d, 0) + n
    return replace(c, groups=tuple(counts.items()))


def _change_count(c: Caption) -> list[Caption]:
    """One group gains a member, or loses one while at least one stays."""
    out = []
    for g, (d, n) in enumerate(c.groups):
        for m in (n + 1, n - 1):
            if 1 <= m < len(NUMBER_WORDS):
                out.append(replace(c, groups=(*c.groups[:g], (d, m), *c.groups[g + 1 :])))
    return out


def _change_relation(c: Caption) -> list[Caption]:
    if c.relation is None:
        return []
    return [replace(c, relation=replace(c.relation, relation=OPPOSITE[c.relation.relation]))]


def hard_negatives(
    caption: str, objects: Sequence[ShapeObject | dict], kinds: Sequence[str] = NEGATIVE_KINDS
) -> list[Negative]:
    """Every one-change variant of `caption` that is false for `objects`, deduplicated."""
    c = parse_caption(caption)
    makers = {
        "color": lambda: _change_attribute(c, "color"),
        "size": lambda: _change_attribute(c, "size"),
        "shape": lambda: _change_attribute(c, "shape"),
        "count": lambda: _change_count(c),
        "relation": lambda: _change_relation(c),
    }
    out: dict[str, Negative] = {}
    for kind in kinds:
        for variant in makers[kind]():
            text = render_caption(variant)
            if text not in out and text != caption and not caption_holds(text, objects):
                out[text] = Negative(text, kind)
    return list(out.values())


def sample_hard_negative(
    caption: str,
    objects: Sequence[ShapeObject | dict],
    rng: np.random.Generator,
    kinds: Sequence[str] = NEGATIVE_KINDS,
    kind_weights: Mapping[str, float] | None = None,
) -> Negative | None:
    """One hard negative: a kind drawn among those the caption allows (uniformly, or by
    `kind_weights`, default 1 each), then a variant of that kind; None when no change
    makes the caption false."""
    return pick_hard_negative(by_kind(hard_negatives(caption, objects, kinds)), rng, kind_weights)


def by_kind(negatives: Sequence[Negative]) -> dict[str, list[Negative]]:
    """Negatives grouped by kind, kinds in first-seen order."""
    out: dict[str, list[Negative]] = {}
    for n in negatives:
        out.setdefault(n.kind, []).append(n)
    return out


def pick_hard_negative(
    groups: Mapping[str, Sequence[Negative]],
    rng: np.random.Generator,
    kind_weights: Mapping[str, float] | None = None,
) -> Negative | None:
    """A kind of `groups` (uniformly, or by `kind_weights`), then one of its negatives."""
    kinds = [k for k in groups if groups[k] and (kind_weights or {}).get(k, 1.0) > 0]
    if not kinds:
        return None
    if kind_weights:
        w = np.array([kind_weights.get(k, 1.0) for k in kinds], dtype=np.float64)
        kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
    else:
        kind = kinds[int(rng.integers(len(kinds)))]
    options = groups[kind]
    return options[int(rng.integers(len(options)))]


def random_negative(
    objects: Sequence[ShapeObject | dict],
    candidates: Sequence[str],
    rng: np.random.Generator,
    tries: int = 20,
) -> Negative | None:
    """A caption drawn from `candidates` (other images' captions) that is false for
    `objects`; None when `tries` draws found none."""
    if not candidates:
        return None
    for _ in range(tries):
        text = candidates[int(rng.integers(len(candidates)))]
        if not caption_holds(text, objects):
            return Negative(text, "random")
    return None
