"""How alike the text stream makes a sentence and its twin with one word changed: the
cosine of the changed word's vector after each layer, for ViLBERT's text stream (alone,
without co-attention) against the packaged MiniLM it was initialised from.

    python docs/experiments/diagnosis/relation_words.py [VILBERT_MODEL]
"""

import sys

import torch
from transformers import AutoModel

from service.data.tokenizer import minilm_dir
from service.models.vilbert import extended_mask
from service.store import ModelStore
from service.training.evaluate import load_model

store = ModelStore("model_store")
ref = sys.argv[1] if len(sys.argv) > 1 else "shapes-vilbert"
model, tok = load_model(store, store.resolve(ref))
minilm = AutoModel.from_pretrained(str(minilm_dir())).eval()
BASE = "is the red circle left of the blue triangle?"
TWINS = {
    "left -> right": BASE.replace("left", "right"),
    "above -> below": (BASE.replace("left of", "above"), BASE.replace("left of", "below")),
    "red -> green": BASE.replace("red", "green"),
    "circle -> triangle": BASE.replace("circle", "triangle", 1),
}


def changed_cosines(a: str, b: str) -> tuple[list[float], list[float]]:
    x = tok([a, b], return_tensors="pt", padding=True)
    ids = x["input_ids"]
    k = int((ids[0] != ids[1]).nonzero()[0])
    t = model.text_embeddings(ids, torch.zeros_like(ids))
    mask = extended_mask(x["attention_mask"], t.dtype)
    ours = [t]
    for layer in model.text_layers:
        ours.append(layer(ours[-1], mask))
    theirs = minilm(**x, output_hidden_states=True).hidden_states

    def cos(hs):
        return [round(torch.cosine_similarity(h[0, k], h[1, k], 0).item(), 3) for h in hs]

    return cos(ours), cos(theirs)


print(f"co-attention joins after text layer {model._text_only_layers()}")
with torch.no_grad():
    for name, twin in TWINS.items():
        a, b = twin if isinstance(twin, tuple) else (BASE, twin)
        ours, theirs = changed_cosines(a, b)
        print(f"{name}: embeddings, then after each layer\n  ours   {ours}\n  MiniLM {theirs}")
