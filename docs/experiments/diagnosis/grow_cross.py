"""Does LXMERT fit the hard negatives with more cross-modal depth? LXMERT@4 grown to
LAYERS cross-modality layers (the added ones copies of its last), then fine-tuned on
matching alone with twins only, as section 8's run of the model as shipped; writes
`lxmert-grown` into STORE, which must hold shapes-lxmert@4 and shapes-detector@1 (a copy
of model_store/, not the repository's).

    python docs/experiments/diagnosis/grow_cross.py STORE FEATURES DATA SECONDS LAYERS
"""

import sys
from dataclasses import asdict

from transformed import finetune_transformed

from service.models.backbone import build_backbone

store, features, data, seconds, layers = sys.argv[1:6]
PREFIX = "lxmert.encoder.x_layers."


def grown(model):
    old = model.config.x_layers
    big = build_backbone("lxmert", {**asdict(model.config), "x_layers": int(layers)})
    state = {}
    for k, v in model.state_dict().items():
        state[k] = v
        if k.startswith(PREFIX) and int(k[len(PREFIX) :].split(".")[0]) == old - 1:
            rest = k[len(PREFIX) :].split(".", 1)[1]
            for i in range(old, int(layers)):  # the last layer, copied upward
                state[f"{PREFIX}{i}.{rest}"] = v.clone()
    big.load_state_dict(state)
    print(f"cross-modality layers {old} -> {layers}", flush=True)
    return big


finetune_transformed(
    grown,
    task="match",
    init="shapes-lxmert@4",
    features_dir=features,
    data_dir=data,
    store_root=store,
    out_name="lxmert-grown",
    steps=1500,
    batch_size=64,
    lr=3e-4,
    max_seconds=float(seconds),
    mix={"align_rank": 1, "complete_share": 1, "hard_share": 1, "word_check": 1},
    command="docs/experiments/diagnosis/grow_cross.py",
)
