"""Relation questions of a split, by what they ask (yes/no, colour, shape, size, count), and
the yes/no ones asked again with the relation word turned to its opposite ("left of" <->
"right of", "above" <-> "below"; a relation the data asks about holds or clearly fails,
so the right answer turns too): how often does the model's answer turn?

    python docs/experiments/diagnosis/relation_questions.py MODEL [SPLIT DATA FEATURES]
"""

import sys
from collections import defaultdict

import numpy as np
import torch

from service.data.shapes import COLORS, SHAPES, SIZES
from service.store import ModelStore
from service.training.evaluate import load_model, pair_scores
from service.training.examples import PairSource
from service.training.negatives import OPPOSITE

split, data, features = (
    sys.argv[2:5] if len(sys.argv) > 4 else ("test", "data/shapes", "data/features")
)
store = ModelStore("model_store")
manifest = store.resolve(sys.argv[1])
model, tok = load_model(store, manifest)
src = PairSource.load(data, features, split)
questions = [
    (q["question"], q["answer"], src.region_set(i))
    for i in range(len(src))
    for q in src.questions(i)
    if q["family"] == "relation"
]


def asks(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return next(
        (k for k, v in [("colour", COLORS), ("shape", SHAPES), ("size", SIZES)] if answer in v),
        "count",
    )


def flipped(question: str) -> str:
    rel = next(r for r in OPPOSITE if f" {r} " in question)
    return question.replace(f" {rel} ", f" {OPPOSITE[rel]} ", 1)


with torch.inference_mode():
    texts = [q for q, _, _ in questions]
    regions = [r for _, _, r in questions]
    yes_no = [k for k, (_, a, _) in enumerate(questions) if a in ("yes", "no")]
    logits = pair_scores(model, tok, "answer", texts, regions)
    turned = pair_scores(
        model, tok, "answer", [flipped(texts[k]) for k in yes_no], [regions[k] for k in yes_no]
    )
pred = [manifest.answers[int(row.argmax())] for row in logits]
answers = np.array([a for _, a, _ in questions])
by_kind = defaultdict(list)
for (_, answer, _), p in zip(questions, pred, strict=True):
    by_kind[asks(answer)].append(p == answer)
print(f"relation questions: {len(pred)}, accuracy {np.mean(np.array(pred) == answers):.3f}")
for kind, ok in sorted(by_kind.items()):
    print(f"  {kind}: {len(ok)}, {np.mean(ok):.3f}")
yes, no = manifest.answers.index("yes"), manifest.answers.index("no")
said = (logits[yes_no, yes] > logits[yes_no, no]).numpy()
said_turned = (turned[:, yes] > turned[:, no]).numpy()
truth = np.array([questions[k][1] == "yes" for k in yes_no])
print(
    f"yes/no as asked: accuracy {np.mean(said == truth):.3f}, says yes {said.mean():.3f}; "
    f"turned: accuracy {np.mean(said_turned != truth):.3f}, "
    f"answer turns {np.mean(said != said_turned):.3f}"
)
