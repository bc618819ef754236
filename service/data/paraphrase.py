"""A paraphrase test set: shapes-world questions reworded with words training never saw.

Each question is parsed back into the generator's template (service.data.language) and
its slots, then rewritten in two ways that keep the answer:

  frame   another wording of the same question kind ("what color is the {p}?" ->
          "what hue is the {p}?", "how many {ps} are there?" -> "count the {ps}.",
          "is there not {a}?" -> "is {a} absent?").
  slots   inside the descriptions, "small" -> "tiny", "large" -> "huge", "gray" ->
          "grey", the generic "shape(s)" -> "object(s)"; relations "left of" -> "to the
          left of", "above" -> "over", "below" -> "beneath".

`NEW_WORDS` are the words the rewrites bring that the question generator never says.
`paraphrase_records` checks against a training split that none of them occurs in its
texts and that no paraphrased question does, so the set measures how a model reads
wordings it was never trained on. ("big" would be the natural word for "large", but the
generator asks "how big is the ...?", so "huge" stands in.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from service.data import language as lang
from service.data.shapes import COLORS, SHAPES, SIZES

SLOT_WORDS = {"small": "tiny", "large": "huge", "gray": "grey", "shape": "object"}
RELATION_WORDS = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "over",
    "below": "beneath",
}

# question kind -> (the generator's templates, paraphrase frames with the same slots)
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "exist": (
        lang.EXIST_TEMPLATES,
        (
            "is there any {p}?",
            "is {a} visible?",
            "do you notice {a}?",
            "does the picture show {a}?",
        ),
    ),
    "exist_not": (
        lang.EXIST_NOT_TEMPLATES,
        ("is {a} absent?", "is {a} missing from the picture?", "does the picture lack {a}?"),
    ),
    "count": (
        lang.COUNT_TEMPLATES,
        ("count the {ps}.", "how many {ps} are visible?", "how many {ps} can you spot?"),
    ),
    "color": (
        lang.COLOR_TEMPLATES,
        (
            "what hue is the {p}?",
            "what is the colour of the {p}?",
            "which hue does the {p} have?",
            "tell me the colour of the {p}.",
        ),
    ),
    "shape": (
        lang.SHAPE_TEMPLATES,
        (
            "what is the {adj} figure?",
            "what form does the {adj} object have?",
            "which figure is the {adj} one?",
        ),
    ),
    "shape_alone": (
        lang.SHAPE_ALONE_TEMPLATES,
        (
            "what figure is in the picture?",
            "which form is visible?",
            "what figure does the picture show?",
        ),
    ),
    "size": (
        lang.SIZE_TEMPLATES,
        (
            "is the {p} tiny or huge?",
            "is the {p} huge or tiny?",
            "tell me if the {p} is tiny or huge.",
        ),
    ),
    "rel_yesno": (
        lang.REL_YESNO_TEMPLATES,
        ("is the {p} situated {rel} the {q}?", "does the {p} sit {rel} the {q}?"),
    ),
    "rel_color": (
        lang.REL_COLOR_TEMPLATES,
        ("what hue is the {p} {rel} the {q}?", "what is the colour of the {p} {rel} the {q}?"),
    ),
    "rel_shape": (lang.REL_SHAPE_TEMPLATES, ("what is the {adj} figure {rel} the {q}?",)),
    "rel_shape_alone": (
        lang.REL_SHAPE_ALONE_TEMPLATES,
        ("what figure is {rel} the {q}?", "which form is {rel} the {q}?"),
    ),
    "rel_size": (lang.REL_SIZE_TEMPLATES, ("is the {p} {rel} the {q} tiny or huge?",)),
    "rel_count": (
        lang.REL_COUNT_TEMPLATES,
        ("count the {ps} {rel} the {q}.", "how many {ps} are visible {rel} the {q}?"),
    ),
}


def words(text: str) -> list[str]:
    """Lower-case words of a text (letters only)."""
    return re.findall(r"[a-z]+", text.lower())


def _generator_words() -> set[str]:
    texts = [t for templates, _ in KINDS.values() for t in templates]
    texts += [*COLORS, *SHAPES, *SIZES, *lang.RELATIONS, *lang.NUMBER_WORDS, "a an shapes"]
    texts += [f"{s}s" for s in SHAPES]
    return {w for t in texts for w in words(t.replace("{", " ").replace("}", " "))}


def _rewrite_words() -> set[str]:
    texts = [f for _, frames in KINDS.values() for f in frames]
    texts += [*SLOT_WORDS.values(), *RELATION_WORDS.values(), "objects"]
    slots = ("{a}", "{p}", "{ps}", "{adj}", "{rel}", "{q}")
    for s in slots:
        texts = [t.replace(s, " ") for t in texts]
    return {w for t in texts for w in words(t)}


NEW_WORDS = frozenset(_rewrite_words() - _generator_words())

# ---- parsing the generator's questions ---------------------------------------------------

_SIZE = "|".join(SIZES)
_COLOR = "|".join(COLORS)
_PHRASE = rf"(?:(?:{_SIZE}) )?(?:(?:{_COLOR}) )?(?:{'|'.join(SHAPES)}|shape)"
_SLOTS = {
    "a": rf"(?:a|an) {_PHRASE}",
    "p": _PHRASE,
    "ps": rf"{_PHRASE}s",
    "q": _PHRASE,
    "adj": rf"(?:(?:{_SIZE}) (?:{_COLOR})|{_SIZE}|{_COLOR})",
    "rel": "|".join(lang.RELATIONS),
}


def _pattern(template: str) -> re.Pattern:
    """A template as a regex with one named group per slot."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        re.escape(part) if k % 2 == 0 else f"(?P<{part}>{_SLOTS[part]})"
        for k, part in enumerate(parts)
    )
    return re.compile(regex)


_PATTERNS = [(kind, _pattern(t)) for kind, (templates, _) in KINDS.items() for t in templates]


def parse(question: str) -> tuple[str, dict[str, str]]:
    """(question kind, slots) of a generator question; ValueError when none or two fit."""
    found = [(kind, m.groupdict()) for kind, p in _PATTERNS if (m := p.fullmatch(question))]
    if len(found) != 1:
        why = "no template" if not found else f"{len(found)} templates"
        raise ValueError(f"{why} of the question generator fits {question!r}")
    return found[0]


# ---- rewriting ---------------------------------------------------------------------------


def _reword_phrase(text: str) -> str:
    """'small gray shapes' -> 'tiny grey objects'."""
    out = []
    for w in text.split():
        plural = w.endswith("s") and w[:-1] in SLOT_WORDS
        base = w[:-1] if plural else w
        out.append(SLOT_WORDS.get(base, base) + ("s" if plural else ""))
    return " ".join(out)


def _reword_slot(name: str, value: str) -> str:
    if name == "rel":
        return RELATION_WORDS[value]
    if name == "a":
        return lang.with_article(_reword_phrase(value.split(" ", 1)[1]))
    return _reword_phrase(value)


def paraphrase(question: str, rng: np.random.Generator) -> str:
    """A rewording of a generator question with the same answer (frame drawn from rng)."""
    kind, slots = parse(question)
    frames = KINDS[kind][1]
    frame = frames[int(rng.integers(len(frames)))]
    values = {name: _reword_slot(name, v) for name, v in slots.items()}
    if "{p}" in frame and "p" not in values:  # "is there {a}?" -> "is there any {p}?"
        values["p"] = values["a"].split(" ", 1)[1]
    if "{a}" in frame and "a" not in values:
        values["a"] = lang.with_article(values["p"])
    return frame.format(**values)


def training_texts(records: Iterable[dict]) -> set[str]:
    """Every caption, question and referring expression of a split's records."""
    texts = set()
    for r in records:
        texts.update(r.get("captions") or [])
        texts.update(q["question"] for q in r.get("questions") or [])
        texts.update(e["expression"] for e in r.get("refexps") or [])
    return texts


def vocabulary(texts: Iterable[str]) -> set[str]:
    return {w for t in texts for w in words(t)}


def paraphrase_records(
    records: Sequence[dict], train_records: Sequence[dict], seed: int = 0
) -> list[dict]:
    """Copies of `records` with every question paraphrased (answer and family kept, the
    original under "original").

    Raises ValueError when a new word occurs in the training texts, or a paraphrase does
    not contain one or occurs in them: the set's point is wordings never trained on.
    """
    train_texts = training_texts(train_records)
    seen = NEW_WORDS & vocabulary(train_texts)
    if seen:
        raise ValueError(f"the training texts use the paraphrases' words {sorted(seen)}")
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        questions = []
        for q in r.get("questions") or []:
            text = paraphrase(q["question"], rng)
            if text in train_texts or not NEW_WORDS & set(words(text)):
                raise ValueError(f"paraphrase {text!r} of {q['question']!r} is not new")
            questions.append({**q, "question": text, "original": q["question"]})
        out.append({**r, "questions": questions})
    return out
