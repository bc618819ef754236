"""What checking claims adds to the match score's cost: `eval_match`'s texts of the first
150 val images (600 texts) scored as served without claims (`match_pair_parts`, by
sentence where the calibration says) and their claims asked (`least_claim_margins`),
batch 32, timed on the second of two passes.

    python docs/experiments/diagnosis/claims_cost.py [DATA FEATURES]
"""

import sys
import time

import torch

from service.models.backbone import MatchCalibration
from service.store import ModelStore
from service.training.evaluate import (
    draw_match_pairs,
    least_claim_margins,
    load_model,
    match_pair_parts,
)
from service.training.examples import PairSource

data, features = sys.argv[1:3] if len(sys.argv) > 2 else ("data/shapes", "data/features")
store = ModelStore("model_store")
pairs = draw_match_pairs(PairSource.load(data, features, "val"), 150, 0)
for ref in ("shapes-lxmert@4", "shapes-vilbert@4"):
    manifest = store.resolve(ref)
    model, tok = load_model(store, manifest)
    by_sentence = MatchCalibration.from_dict(manifest.match_calibration).by_sentence
    with torch.inference_mode():
        for _ in range(2):
            t0 = time.perf_counter()
            match_pair_parts(model, tok, pairs.texts, pairs.regions, by_sentence, batch_size=32)
            t1 = time.perf_counter()
            least_claim_margins(
                model, tok, manifest.answers, pairs.texts, pairs.regions, batch_size=32
            )
            t2 = time.perf_counter()
    print(
        f"{ref}: {len(pairs.texts)} texts; served without claims {t1 - t0:.2f} s, "
        f"claims {t2 - t1:.2f} s: x{(t2 - t0) / (t1 - t0):.2f}"
    )
