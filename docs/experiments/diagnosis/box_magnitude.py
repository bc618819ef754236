"""How loud is the box in ViLBERT's region embedding? Over the first 2,000 regions of the
test features, the part of Linear(feature) and of Linear(box) that varies between regions
(the mean norm once the mean over regions is taken out), for the entry MODEL and for a
fresh ViLBERT of the same config at the released initialisation.

    python docs/experiments/diagnosis/box_magnitude.py MODEL [STORE FEATURES]
"""

import sys

import torch
from safetensors.torch import load_file

from service.models.vilbert import ImageEmbeddings, region_locations
from service.store import ModelStore
from service.training.evaluate import load_model

store, features = sys.argv[2:4] if len(sys.argv) > 3 else ("model_store", "data/features")
model, _ = load_model(ModelStore(store), ModelStore(store).resolve(sys.argv[1]))
regions = load_file(f"{features}/test.safetensors")
feats = regions["features"][:2000].float()  # (N, F)
locs = region_locations(regions["boxes"][:2000].float()[None])[0]  # (N, 5)
norms = feats.norm(dim=-1).mean(), locs.norm(dim=-1).mean()
print(f"region feature norm {norms[0]:.1f}, box norm {norms[1]:.2f}")

torch.manual_seed(0)
fresh = ImageEmbeddings(model.config)
fresh.apply(model._init_weights)


def varying(x: torch.Tensor) -> float:
    return (x - x.mean(0)).norm(dim=-1).mean().item()


print("embedding | feature term | box term | box / feature | box weights, mean abs")
for name, emb in ((sys.argv[1], model.image_embeddings), ("fresh", fresh)):
    with torch.no_grad():
        f, b = varying(emb.feature(feats)), varying(emb.location(locs))
    print(f"{name} | {f:.2f} | {b:.3f} | {b / f:.1%} | {emb.location.weight.abs().mean():.4f}")
