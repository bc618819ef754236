"""How well the detector's own regions answer the test count questions: count the regions
above a score threshold whose class, colour and size match the question's words.

    python docs/experiments/vilbert-counting/count_ceiling.py [DATA FEATURES]
"""

import sys
from collections import defaultdict

import numpy as np

from service.data.shapes import COLORS, SHAPES, SIZES
from service.training.examples import PairSource

data, features = sys.argv[1:3] if len(sys.argv) > 2 else ("data/shapes", "data/features")
CLASSES, COLOURS, SIZES = list(SHAPES), list(COLORS), list(SIZES)


def words(question: str) -> tuple[str | None, str | None, str | None]:
    w = question.replace("?", "").split()
    size = next((x for x in w if x in SIZES), None)
    colour = next((x for x in w if x in COLOURS), None)
    shape = next((x.rstrip("s") for x in w if x.rstrip("s") in CLASSES), None)
    return size, colour, shape


source = PairSource.load(data, features, "test")
right = defaultdict(list)
for i in range(len(source)):
    r = source.regions(i)
    probs = r.class_probs[:, 1:] if r.class_probs.shape[1] == 4 else r.class_probs
    cls, col, siz = probs.argmax(1), r.attributes["color"].argmax(1), r.attributes["size"].argmax(1)
    for q in source.questions(i):
        if q["family"] != "count":
            continue
        size, colour, shape = words(q["question"])
        for threshold in (0.3, 0.5, 0.7, 0.9):
            keep = r.scores > threshold
            if colour:
                keep &= col == COLOURS.index(colour)
            if size:
                keep &= siz == SIZES.index(size)
            if shape:
                keep &= cls == CLASSES.index(shape)
            right[threshold].append(int(keep.sum()) == int(q["answer"]))
for threshold, hits in right.items():
    print(f"score > {threshold}: {100 * np.mean(hits):.1f}% of {len(hits)} count questions")
