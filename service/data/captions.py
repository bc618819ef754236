"""Reading shapes-world captions: the parser and renderer of the grammar that
`service.data.language` generates, and the questions that check a caption's claims.

A caption is a listing of every object, grouped by the attributes it states ("a small red
circle, two large blue triangles and a green rectangle"), a relation ("the small red circle
is left of the large blue triangle", or "a red circle above a blue shape"), both (the
listing, then the relation as a second sentence), or "<n> shapes on a pastel background".
Its truth for a scene is `service.training.negatives.caption_holds`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from service.data.language import NUMBER_WORDS, RELATIONS, phrase, plural
from service.data.shapes import COLORS, SHAPES, SIZES

_REL = "|".join(RELATIONS)
_RELATION_SENTENCE = re.compile(rf"^(the|an?) (.+?) is ({_REL}) (the|an?) (.+)$")
_RELATION_PHRASE = re.compile(rf"^(an?) (.+?) ({_REL}) (an?) (.+)$")
_BACKGROUND = re.compile(r"^(\w+) shapes? on a pastel background$")

Desc = tuple[str | None, str | None, str | None]  # (size, colour, shape); None = unsaid


@dataclass(frozen=True)
class Relation:
    subject: Desc
    relation: str  # one of language.RELATIONS
    object: Desc
    article: str  # "the" or "a": how the caption names both sides
    copula: bool = True  # "X is left of Y" (True) or "a X left of a Y" (False)


@dataclass(frozen=True)
class Caption:
    """A parsed caption: a listing (groups of identical descriptions), a relation, or both.

    `total` is set for "<n> shapes on a pastel background" and nothing else.
    """

    groups: tuple[tuple[Desc, int], ...] = ()  # (description, count), in caption order
    relation: Relation | None = None
    total: int | None = None


# ---------------------------------------------------------------- parsing and rendering


def parse_desc(words: str) -> Desc:
    """'small red circle' -> ('small', 'red', 'circle'); 'red shape' -> (None, 'red', None)."""
    parts = words.split()
    if not parts:
        raise ValueError("empty description")
    head = parts[-1]
    if head != "shape" and head not in SHAPES:
        raise ValueError(f"{words!r} does not end in a shape")
    size = color = None
    for w in parts[:-1]:
        if w in SIZES and size is None and color is None:
            size = w
        elif w in COLORS and color is None:
            color = w
        else:
            raise ValueError(f"unexpected word {w!r} in {words!r}")
    return (size, color, None if head == "shape" else head)


def _parse_group(text: str) -> tuple[Desc, int]:
    first, _, rest = text.partition(" ")
    if first in ("a", "an"):
        return parse_desc(rest), 1
    if first not in NUMBER_WORDS[2:]:
        raise ValueError(f"cannot read the count of {text!r}")
    if not rest.endswith("s"):
        raise ValueError(f"plural expected in {text!r}")
    return parse_desc(rest[:-1]), NUMBER_WORDS.index(first)


def _parse_listing(text: str) -> tuple[tuple[Desc, int], ...]:
    return tuple(_parse_group(p) for p in text.replace(" and ", ", ").split(", "))


def _article(word: str) -> str:
    return "the" if word == "the" else "a"


def parse_caption(text: str) -> Caption:
    """Read a shapes-world caption into its claims; ValueError for any other text."""
    text = text.strip()
    if m := _BACKGROUND.match(text):
        if m[1] not in NUMBER_WORDS:
            raise ValueError(f"unknown number word in {text!r}")
        return Caption(total=NUMBER_WORDS.index(m[1]))
    listing, _, sentence = text.partition(". ")
    if sentence:
        m = _RELATION_SENTENCE.match(sentence)
        if not m or _article(m[1]) != _article(m[4]):
            raise ValueError(f"cannot read the relation in {text!r}")
        rel = Relation(parse_desc(m[2]), m[3], parse_desc(m[5]), _article(m[1]))
        return Caption(groups=_parse_listing(listing), relation=rel)
    if (m := _RELATION_SENTENCE.match(text)) and _article(m[1]) == _article(m[4]):
        rel = Relation(parse_desc(m[2]), m[3], parse_desc(m[5]), _article(m[1]))
        return Caption(relation=rel)
    if m := _RELATION_PHRASE.match(text):
        try:
            rel = Relation(parse_desc(m[2]), m[3], parse_desc(m[5]), "a", copula=False)
            return Caption(relation=rel)
        except ValueError:
            pass  # not a relation phrase after all: read it as a listing
    return Caption(groups=_parse_listing(text))


def _named(d: Desc, article: str) -> str:
    p = phrase(d)
    if article == "the":
        return "the " + p
    return ("an " if p[0] in "aeiou" else "a ") + p


def _render_listing(groups: Sequence[tuple[Desc, int]]) -> str:
    parts = [_named(d, "a") if k == 1 else f"{NUMBER_WORDS[k]} {plural(d)}" for d, k in groups]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def render_caption(c: Caption) -> str:
    """The text of a parsed caption; `render_caption(parse_caption(t)) == t` for captions."""
    if c.total is not None:
        noun = "shape" if c.total == 1 else "shapes"
        return f"{NUMBER_WORDS[c.total]} {noun} on a pastel background"
    r = c.relation
    if not c.groups and not r.copula:
        return f"{_named(r.subject, 'a')} {r.relation} {_named(r.object, 'a')}"
    sentence = r and f"{_named(r.subject, r.article)} is {r.relation} {_named(r.object, r.article)}"
    if not c.groups:
        return sentence
    listing = _render_listing(c.groups)
    return listing if r is None else f"{listing}. {sentence}"


# ---------------------------------------------------------------- claims as questions

MAX_CLAIMS = 8  # claims of one text asked, at most: a scene's six groups, its total, a relation


def claim_questions(text: str) -> list[tuple[str, str]]:
    """Each claim of a caption as a question the VQA head answers, with the answer the
    caption states; [] for a text this grammar does not read.

    A listing names every object, so it claims each group's count ("how many small red
    circles are there?" -> "1") and the total ("how many shapes are there?"); a relation
    claims "is the <subject> <relation> the <object>?" -> "yes". The caption is true when
    every claim is (docs/experiments/diagnosis/, section 12).
    """
    try:
        c = parse_caption(text.strip().lower().rstrip("."))
    except ValueError:
        return []
    if c.total is not None:
        return [("how many shapes are there?", str(c.total))]
    out = [(f"how many {plural(d)} are there?", str(k)) for d, k in c.groups]
    if c.groups:
        out.append(("how many shapes are there?", str(sum(k for _, k in c.groups))))
    if (r := c.relation) is not None:
        out.append((f"is the {phrase(r.subject)} {r.relation} the {phrase(r.object)}?", "yes"))
    return out


def expand_claim_questions(
    texts: Sequence[str], answers: Sequence[str]
) -> tuple[list[str], list[int], list[int]]:
    """Every text's `claim_questions` (its first MAX_CLAIMS), flattened: the questions,
    each stated answer's index in `answers` (-1: not among them, so not confirmable),
    and the index of the text each question is of."""
    index = {a: k for k, a in enumerate(answers)}
    questions, expected, owner = [], [], []
    for i, text in enumerate(texts):
        for question, answer in claim_questions(text)[:MAX_CLAIMS]:
            questions.append(question)
            expected.append(index.get(answer, -1))
            owner.append(i)
    return questions, expected, owner
