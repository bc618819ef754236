"""ViLBERT@3 (or the entry INIT of STORE) with its text prefix (the text embeddings and the
text layers before the first co-attention layer) put back to the packaged MiniLM's weights
and frozen, then fine-tuned on task "all" with ../gpu-continue/mix.json (or the mix file
MIX); writes `vilbert-reset` into STORE, which must hold shapes-vilbert@3 (or INIT) and
shapes-detector@1 (a copy of model_store/, not the repository's).

    python docs/experiments/diagnosis/reset_text.py STORE FEATURES DATA SECONDS [MIX [INIT]]
"""

import sys

from transformed import VILBERT_CONTINUATION, finetune_transformed

from service.data.tokenizer import minilm_dir
from service.models.vilbert_checkpoint import init_text_from_bert

store, features, data, seconds = sys.argv[1:5]
mix = sys.argv[5] if len(sys.argv) > 5 else "docs/experiments/gpu-continue/mix.json"
init = sys.argv[6] if len(sys.argv) > 6 else "shapes-vilbert@3"


def with_minilm_prefix(model):
    layers = model._text_only_layers()
    prefix = ("text_embeddings.", *(f"text_layers.{i}." for i in range(layers)))
    keep = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(prefix)}
    init_text_from_bert(model, minilm_dir())  # every text weight ...
    model.load_state_dict(keep, strict=False)  # ... then all but the prefix back to INIT's
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(prefix))
    print(f"text embeddings and layers 0-{layers - 1}: MiniLM's, frozen", flush=True)
    return model


finetune_transformed(
    with_minilm_prefix,
    **VILBERT_CONTINUATION,
    init=init,
    features_dir=features,
    data_dir=data,
    store_root=store,
    out_name="vilbert-reset",
    max_seconds=float(seconds),
    mix=mix,
    command="docs/experiments/diagnosis/reset_text.py " + " ".join(sys.argv[1:]),
)
