"""Does the model know what a hard negative changes? Each text of `eval_match`'s pairs is
read into its claims (`negatives.parse_caption`) and every claim asked as a question of
the VQA head: "how many <group>s are there?" for each group of the listing (the expected
answer: its count), "how many shapes are there?" for the listing's total, and "is the
<subject> <relation> the <object>?" for the relation sentence (expected: yes). A text's
claim score is its least margin, the expected answer's logit less the best other one's:
above 0 when the head answers every claim as the text states it.

Pair accuracy as `eval_match` counts it (the true caption above 0, its twin not), the
ranking (the true caption above its twin), by kind of change, for the claim score and for
the alignment head's logit on the same pairs.

    python docs/experiments/diagnosis/claim_questions.py MODEL [SPLIT DATA FEATURES STORE]
"""

import sys
from collections import defaultdict

import numpy as np
import torch

from service.data.language import phrase, plural
from service.models.backbone import MatchCalibration
from service.store import ModelStore
from service.training.evaluate import (
    draw_match_pairs,
    load_model,
    match_pair_parts,
    pair_scores,
    served_logits,
)
from service.training.examples import PairSource
from service.training.negatives import parse_caption

split, data, features, root = (
    sys.argv[2:6] if len(sys.argv) > 5 else ("test", "data/shapes", "data/features", "model_store")
)
store = ModelStore(root)
manifest = store.resolve(sys.argv[1])
model, tok = load_model(store, manifest)


def claims(text: str) -> list[tuple[str, str]]:
    """(question, expected answer) for each claim of a shapes-world caption."""
    c = parse_caption(text)
    if c.total is not None:
        return [("how many shapes are there?", str(c.total))]
    out = [(f"how many {plural(d)} are there?", str(k)) for d, k in c.groups]
    if c.groups:
        out.append(("how many shapes are there?", str(sum(k for _, k in c.groups))))
    if (r := c.relation) is not None:
        out.append((f"is the {phrase(r.subject)} {r.relation} the {phrase(r.object)}?", "yes"))
    return out


def scores(split: str):
    """eval_match's pairs on `split`, each text's claim score and head logit."""
    pairs = draw_match_pairs(PairSource.load(data, features, split))
    asked, owner = [], []
    for k, text in enumerate(pairs.texts):
        for q in claims(text):
            asked.append(q)
            owner.append(k)
    owner = np.array(owner)
    with torch.inference_mode():
        questions, regions = [q for q, _ in asked], [pairs.regions[k] for k in owner]
        logits = pair_scores(model, tok, "answer", questions, regions)
        head = pair_scores(model, tok, "match", pairs.texts, pairs.regions).numpy()
        calibration = MatchCalibration.from_dict(manifest.match_calibration)
        parts, rows = match_pair_parts(
            model, tok, pairs.texts, pairs.regions, calibration.by_sentence
        )
        served = served_logits(calibration, parts, rows).numpy()
    answers = manifest.answers
    known = torch.tensor([a in answers for _, a in asked])
    expected = torch.tensor([answers.index(a) if a in answers else 0 for _, a in asked])
    own = logits.gather(1, expected[:, None]).squeeze(1)
    others = logits.scatter(1, expected[:, None], float("-inf")).max(1).values
    # an answer the head cannot give ("7": a count twin's total) is a claim it cannot confirm
    margin = torch.where(known, own - others, float("-inf")).numpy()
    score = np.full(len(pairs.texts), np.inf)
    np.minimum.at(score, owner, margin)
    print(f"{manifest.ref}, {split}: {len(pairs.texts)} texts, {len(asked)} claims asked")
    return pairs, score, head, served


def accuracies(pairs, s: np.ndarray, t: float = 0.0) -> tuple[float, float, float]:
    """Pair accuracy with random and with hard negatives, true partial captions kept."""

    def acc(which):
        pos, neg = np.array(which).T
        return np.mean((s[pos] > t) & (s[neg] <= t))

    return acc(pairs.random), acc(pairs.hard), np.mean(s[pairs.partial] > t)


val, test = scores("val"), scores(split)
grid = np.linspace(-20, 4, 241)
t = grid[np.argmax([sum(accuracies(val[0], val[1], g)) for g in grid])]
print(f"claim threshold fitted on val: {t:.1f}")


def report(name: str, pairs, s: np.ndarray, t: float = 0.0) -> None:
    def acc(which):
        pos, neg = np.array(which).T
        return np.mean((s[pos] > t) & (s[neg] <= t)), np.mean(s[pos] > s[neg])

    by_kind = defaultdict(list)
    for pair, kind in zip(pairs.hard, pairs.kinds, strict=True):
        by_kind[kind].append(pair)
    kinds = ", ".join(
        f"{k} {100 * acc(v)[0]:.1f}/{100 * acc(v)[1]:.1f}" for k, v in sorted(by_kind.items())
    )
    (ra, rr), (ha, hr) = acc(pairs.random), acc(pairs.hard)
    print(
        f"{name}: random {100 * ra:.1f}% (ranked {100 * rr:.1f}%), hard {100 * ha:.1f}% "
        f"(ranked {100 * hr:.1f}%); true {100 * np.mean(s[pairs.positives] > t):.1f}%, "
        f"partial {100 * np.mean(s[pairs.partial] > t):.1f}%"
    )
    print(f"  hard by kind, accuracy/ranked: {kinds}")


pairs, score, head, served = test
report("claims, threshold 0", pairs, score)
report(f"claims, threshold {t:.1f} (val)", pairs, score, t)
report("head", pairs, head)
report(
    f"head and claims (both above their thresholds, 0 and {t:.1f})",
    pairs,
    np.minimum(head, score - t),
)
report("served (calibrated)", pairs, served)
shifts = np.linspace(-3, 3, 61)
s_best, t_best = max(
    ((a, b) for a in shifts for b in grid[::4]),
    key=lambda st: sum(accuracies(val[0], np.minimum(val[3] - st[0], val[1] - st[1]))),
)
report(
    f"served and claims, thresholds {s_best:.1f} and {t_best:.1f} (val)",
    pairs,
    np.minimum(served - s_best, score - t_best),
)
