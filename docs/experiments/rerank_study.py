"""How much should the alignment head count in the second stage of caption search?

    python docs/experiments/rerank_study.py MODEL DATA_DIR FEATURES_DIR [SPLIT] [GALLERY]

On a validation gallery (default: val, 500 images, each image's first caption as the
query), rank the cosine top 50 by cosine / T + w * log p(match) for several w, and print
text-to-image R@1/5/10 for each (w = inf: the alignment head alone). The service and
`vqa eval` use w = service.models.backbone.RERANK_WEIGHT.
"""

import sys

import torch
import torch.nn.functional as F

from service.models.backbone import two_stage_scores
from service.store import ModelStore
from service.training.evaluate import (
    _images,
    embed_images,
    embed_texts,
    load_model,
    pair_scores,
    relevant_images,
)
from service.training.examples import PairSource
from service.training.metrics import recall_at_k

TOP = 50
WEIGHTS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, float("inf"))


@torch.inference_mode()
def main(model_ref, data_dir, features_dir, split="val", gallery=500):
    store = ModelStore("model_store")
    model, tokenizer = load_model(store, store.resolve(model_ref))
    source = PairSource.load(data_dir, features_dir, split)
    images = _images(source, int(gallery), source.captions)
    queries = [source.captions(i)[0] for i in images]
    regions = [source.region_set(i) for i in images]
    relevant = relevant_images(queries, [source.objects(i) for i in images])
    cosine = embed_texts(model, tokenizer, queries) @ embed_images(model, tokenizer, regions).T
    order = torch.argsort(cosine, dim=1, descending=True, stable=True)  # (Q, N)
    texts = [q for q in queries for _ in range(TOP)]
    pairs = [regions[j] for row in order[:, :TOP].tolist() for j in row]
    logits = pair_scores(model, tokenizer, "match", texts, pairs, batch_size=128)
    logits = logits.view(len(queries), TOP)
    top_cosine = torch.gather(cosine, 1, order[:, :TOP])
    for w in WEIGHTS:
        if w == float("inf"):  # the alignment head alone
            score = F.logsigmoid(logits)
        else:
            score = two_stage_scores(top_cosine, logits, weight=w)
        first = torch.gather(order[:, :TOP], 1, torch.argsort(score, dim=1, descending=True))
        ranked = torch.cat([first, order[:, TOP:]], dim=1).tolist()
        print(f"{model_ref} {split} w={w}: {recall_at_k(ranked, relevant, (1, 5, 10))}")


if __name__ == "__main__":
    main(*sys.argv[1:])
