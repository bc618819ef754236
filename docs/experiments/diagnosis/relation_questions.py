"""Relation questions of a split, by what they ask (yes/no, colour, shape, size, count), and
the yes/no ones asked again with the relation word turned to its opposite ("left of" <->
"right of", "above" <-> "below"; `negatives.turned_question`, which leaves out the turned
questions whose answer is in doubt): how often does the model's answer turn where the
right answer does?

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
from service.training.negatives import turned_question

split, data, features = (
    sys.argv[2:5] if len(sys.argv) > 4 else ("test", "data/shapes", "data/features")
)
store = ModelStore("model_store")
manifest = store.resolve(sys.argv[1])
model, tok = load_model(store, manifest)
src = PairSource.load(data, features, split)
questions = [
    (q["question"], q["answer"], src.region_set(i), src.objects(i))
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


yes_no = [k for k, q in enumerate(questions) if q[1] in ("yes", "no")]
twins = {k: turned_question(questions[k][0], questions[k][3]) for k in yes_no}
twinned = [k for k in yes_no if twins[k] is not None]
with torch.inference_mode():
    texts = [q[0] for q in questions]
    regions = [q[2] for q in questions]
    logits = pair_scores(model, tok, "answer", texts, regions)
    turned = pair_scores(
        model, tok, "answer", [twins[k][0] for k in twinned], [regions[k] for k in twinned]
    )
pred = [manifest.answers[int(row.argmax())] for row in logits]
answers = np.array([q[1] for q in questions])
by_kind = defaultdict(list)
for answer, p in zip(answers, pred, strict=True):
    by_kind[asks(answer)].append(p == answer)
print(f"relation questions: {len(pred)}, accuracy {np.mean(np.array(pred) == answers):.3f}")
for kind, ok in sorted(by_kind.items()):
    print(f"  {kind}: {len(ok)}, {np.mean(ok):.3f}")
yes, no = manifest.answers.index("yes"), manifest.answers.index("no")
said = (logits[yes_no, yes] > logits[yes_no, no]).numpy()
truth = answers[yes_no] == "yes"
print(f"yes/no as asked: accuracy {np.mean(said == truth):.3f}, says yes {said.mean():.3f}")
said = (logits[twinned, yes] > logits[twinned, no]).numpy()
said_turned = (turned[:, yes] > turned[:, no]).numpy()
truth = np.array([twins[k][1] == "yes" for k in twinned])
flips = answers[twinned] != np.array([twins[k][1] for k in twinned])
turns = np.mean((said != said_turned)[flips])
print(
    f"turned ({len(twinned)} with a clear answer): accuracy {np.mean(said_turned == truth):.3f}; "
    f"where the answer turns ({flips.sum()}), the model's turns {turns:.3f}"
)
