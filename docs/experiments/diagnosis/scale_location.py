"""ViLBERT@3 with its box projection (`image_embeddings.location`, the released
`image_location_embeddings`) multiplied by FACTOR, then fine-tuned on task "all" with
turned_mix.json (or the mix file MIX); writes `vilbert-loc` into STORE, which must hold
shapes-vilbert@3 and shapes-detector@1 (a copy of model_store/, not the repository's).

The region embedding is LayerNorm(Linear(feature) + Linear(box)); after training, the box
term's varying part is about 1% of the feature term's (section 10), so attention barely
sees where a region is. Scaling the box projection keeps the released architecture and
its keys, and only changes the weights' starting point.

    python docs/experiments/diagnosis/scale_location.py STORE FEATURES DATA SECONDS FACTOR [MIX]
"""

import sys

import torch
from transformed import VILBERT_CONTINUATION, finetune_transformed

store, features, data, seconds, factor = sys.argv[1:6]
mix = sys.argv[6] if len(sys.argv) > 6 else "docs/experiments/diagnosis/turned_mix.json"


def with_louder_boxes(model):
    with torch.no_grad():
        model.image_embeddings.location.weight.mul_(float(factor))
        model.image_embeddings.location.bias.mul_(float(factor))
    print(f"box projection x{factor}", flush=True)
    return model


finetune_transformed(
    with_louder_boxes,
    **VILBERT_CONTINUATION,
    init="shapes-vilbert@3",
    features_dir=features,
    data_dir=data,
    store_root=store,
    out_name="vilbert-loc",
    max_seconds=float(seconds),
    mix=mix,
    command="docs/experiments/diagnosis/scale_location.py " + " ".join(sys.argv[1:]),
)
