"""easy-VQA (the `easy_vqa` PyPI package) as records in the shapes-world format.

The package ships 5,000 64x64 PNGs with one shape each and 48,248 questions over 13
answers, but no boxes and no object annotations. We derive the box from the pixels
and the shape and colour from what the questions state.

Boxes are (x1, y1, x2, y2) in pixels with x2, y2 exclusive, as `PIL.Image.getbbox`:
the box covers columns x1..x2-1 and rows y1..y2-1, so x2 / W <= 1.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import easy_vqa
import numpy as np
from PIL import Image

EASYVQA_ANSWERS = (
    "circle",
    "green",
    "red",
    "gray",
    "yes",
    "teal",
    "black",
    "rectangle",
    "yellow",
    "triangle",
    "brown",
    "blue",
    "no",
)  # the package's answers.txt order: index i is class i of an answer head
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")

# A pixel is foreground when it is at least half as far from the background as the
# shape's core (half covered by the shape), or when it touches such a pixel and is
# still visibly off the background: that keeps the anti-aliased rim of the shape but
# not JPEG ringing or noise further out.
CORE_FRACTION = 0.5
RIM_THRESHOLD = 12  # max abs channel difference from the background, 0..255

_NEGATION = re.compile(r"\b(not|no)\b")
_WORD = re.compile(r"[a-z]+")


def derive_box(img: Image.Image) -> tuple[int, int, int, int]:
    """Bounding box (x1, y1, x2, y2), exclusive ends, of the one shape on a plain background."""
    a = np.asarray(img.convert("RGB"), dtype=np.int16)  # (H, W, 3)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])  # (2W + 2H - 4, 3)
    background = np.median(border, axis=0)  # robust while the shape covers < half the border
    diff = np.abs(a - background.astype(np.int16))  # (H, W, 3)
    dist = np.maximum(np.maximum(diff[..., 0], diff[..., 1]), diff[..., 2])  # (H, W)
    peak = int(dist.max())
    if peak <= RIM_THRESHOLD:
        raise ValueError("no foreground: the image is uniform up to noise")
    core = dist > CORE_FRACTION * peak
    fg = _dilate(core) & (dist > RIM_THRESHOLD)
    cols, rows = np.flatnonzero(fg.any(axis=0)), np.flatnonzero(fg.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation: a pixel is set when it or any 8-neighbour is set."""
    h, w = mask.shape
    p = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= p[dy : dy + h, dx : dx + w]
    return out


@cache
def _image_facts(path: str) -> tuple[int, int, tuple[int, int, int, int]]:
    """(width, height, box) of one image file; cached so reloading a split is cheap."""
    with Image.open(path) as img:
        return img.width, img.height, derive_box(img)


def question_family(answer: str) -> str:
    """easy-VQA's three question kinds, named as the shapes world names them."""
    if answer in ("yes", "no"):
        return "exist"
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    raise ValueError(f"not an easy-VQA answer: {answer!r}")


def attributes_from_questions(questions: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """(shape, colour) of an image's one object as its (question, answer) pairs state them.

    Stated: the answer to "what shape/colour ...", the word in "what colour is the circle?"
    or "what is the blue shape?", a word asserted present by an exist question (a yes to
    "is there a ...", a no to "is there not a ..."). Where nothing states it but the exist
    questions rule out all candidates but one, that one. None where neither holds.
    """
    stated: dict[str, set[str]] = {"shape": set(), "color": set()}
    absent: set[str] = set()
    for question, answer in questions:
        words = set(_WORD.findall(question))
        family = question_family(answer)
        if family == "exist":
            present = (answer == "yes") != bool(_NEGATION.search(question))
            named = words & (set(SHAPES) | set(COLORS))
            if present:
                for w in named:
                    stated["shape" if w in SHAPES else "color"].add(w)
            else:
                absent |= named
        else:
            stated[family].add(answer)
            other = "color" if family == "shape" else "shape"
            stated[other] |= words & set(COLORS if other == "color" else SHAPES)
    return _pick(stated["shape"], SHAPES, absent), _pick(stated["color"], COLORS, absent)


def _pick(stated: set[str], choices: tuple[str, ...], absent: set[str]) -> str | None:
    if len(stated) > 1:
        raise ValueError(f"questions contradict each other: {sorted(stated)}")
    if stated:
        return stated.pop()
    left = [c for c in choices if c not in absent]
    return left[0] if len(left) == 1 else None


def load_split(split: str) -> list[dict]:
    """All images of the "train" or "test" split as records, ordered by image id."""
    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    per_image: dict[int, list[tuple[str, str]]] = {i: [] for i in paths}
    for text, answer, image_id in zip(texts, answers, image_ids, strict=True):
        per_image[image_id].append((text, answer))
    folder = Path(next(iter(paths.values()))).parent.resolve()
    return [
        _record(split, i, str(folder / Path(paths[i]).name), per_image[i]) for i in sorted(paths)
    ]


def _record(split: str, image_id: int, path: str, questions: list[tuple[str, str]]) -> dict:
    width, height, box = _image_facts(path)
    shape, color = attributes_from_questions(questions)
    return {
        "id": f"easyvqa_{split}_{image_id:06d}",
        "image": path,
        "width": width,
        "height": height,
        "source": "easy-vqa",
        "objects": [{"box": list(box), "shape": shape, "color": color, "size": None}],
        "captions": [],
        "questions": [
            {"question": q, "answer": a, "family": question_family(a)} for q, a in questions
        ],
        "refexps": [],
    }
