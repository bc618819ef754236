"""Relation claims joined by their opposite ("is the X right of the Y?" -> "no" beside
"is the X left of the Y?" -> "yes"), section 12's second check, tried and not kept.

    python docs/experiments/diagnosis/opposite_claims.py MODEL [DATA FEATURES STORE]
        the claim and its opposite's margins over the relation claims of 200 test images
    python docs/experiments/diagnosis/opposite_claims.py --study MODEL [SPLIT DATA FEATURES STORE]
        claim_questions.py with every relation claim joined by its opposite
"""

import runpy
import sys
from pathlib import Path

import torch

import service.data.captions as captions
from service.models.backbone import claim_margins
from service.store import ModelStore
from service.training.evaluate import draw_match_pairs, load_model, pair_scores
from service.training.examples import PairSource

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
claim_questions = captions.claim_questions


def with_opposite(text: str) -> list[tuple[str, str]]:
    out = claim_questions(text)
    for q, a in list(out):
        rel = next((r for r in OPPOSITE if q.startswith("is the ") and f" {r} the " in q), None)
        if rel is not None and a == "yes":
            out.append((q.replace(f" {rel} the ", f" {OPPOSITE[rel]} the ", 1), "no"))
    return out


def margins(ref: str, data: str, features: str, root: str) -> None:
    store = ModelStore(root)
    manifest = store.resolve(ref)
    model, tok = load_model(store, manifest)
    pairs = draw_match_pairs(PairSource.load(data, features, "test"), 200, 0)
    index = {a: k for k, a in enumerate(manifest.answers)}
    questions, expected, regions = [], [], []
    for text, r in zip(pairs.texts, pairs.regions, strict=True):
        asked = [qa for qa in with_opposite(text) if qa[0].startswith("is the ")]
        if len(asked) == 2:
            questions += [q for q, _ in asked]
            expected += [index[a] for _, a in asked]
            regions += [r, r]
    with torch.inference_mode():
        logits = pair_scores(model, tok, "answer", questions, regions)
    m = claim_margins(logits, torch.tensor(expected)).view(-1, 2)  # (claims, [own, opposite])
    print(f"{ref}: {len(m)} relation claims of 200 test images")
    above = float((m[:, 1] > m[:, 0]).float().mean())
    print(f"  the opposite's margin above the claim's own: {above:.3f}")
    print(f"  correlation of the two margins: {float(torch.corrcoef(m.T)[0, 1]):.2f}")


if __name__ == "__main__":
    if sys.argv[1] == "--study":
        captions.claim_questions = with_opposite  # expand_claim_questions reads it per call
        sys.argv = ["claim_questions.py", *sys.argv[2:]]
        runpy.run_path(str(Path(__file__).with_name("claim_questions.py")), run_name="__main__")
    else:
        args = sys.argv[1:] + ["data/shapes", "data/features", "model_store"][len(sys.argv) - 2 :]
        margins(*args[:4])
