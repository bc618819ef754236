"""LXMERT@4 trained further on its pretraining objectives (`run_pretrain`: masked
cross-modal LM, matching with random captions, masked objects, QA) for a time box; writes
`lxmert-masked` into STORE (a store holding shapes-detector@1, not the repository's).

    python docs/experiments/diagnosis/continue_pretraining.py STORE FEATURES DATA SECONDS
"""

import sys

import service.training.pretrain as pretrain
from service.models.backbone import build_backbone
from service.store import ModelStore

store, features, data, seconds = sys.argv[1:5]


def shipped_lxmert(backbone, source, overrides, seed, init_text):
    shipped = ModelStore("model_store")
    manifest = shipped.resolve("shapes-lxmert@4")
    model = build_backbone("lxmert", manifest.config)
    model.load_state_dict(shipped.load_tensors(manifest))
    return model, None


pretrain.build_pretrain_model = shipped_lxmert
pretrain.run_pretrain(
    "lxmert",
    features,
    data,
    store,
    detector_ref="shapes-detector@1",
    out_name="lxmert-masked",
    steps=5000,
    batch_size=64,
    lr=1e-4,
    max_seconds=float(seconds),
    seed=0,
)
