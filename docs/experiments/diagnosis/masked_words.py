"""LXMERT's masked cross-modal LM on the attribute words of complete captions: each colour,
size and shape word masked in turn, is the head's best word among that attribute's values
the right one? By listed object ("rel": the relation clause). First N test images.

    python docs/experiments/diagnosis/masked_words.py MODEL N [STORE DATA FEATURES]
"""

import sys
from collections import defaultdict

import numpy as np
import torch

from service.data.collate import collate
from service.data.shapes import COLORS, SHAPES, SIZES
from service.store import ModelStore
from service.training.evaluate import load_model
from service.training.examples import PairSource

store_root, data, features = (
    sys.argv[3:6] if len(sys.argv) > 5 else ("model_store", "data/shapes", "data/features")
)
store = ModelStore(store_root)
model, tok = load_model(store, store.resolve(sys.argv[1]))
src = PairSource.load(data, features, "test")
values = {
    name: tok.convert_tokens_to_ids(list(words))
    for name, words in (("colour", COLORS), ("size", SIZES), ("shape", SHAPES))
}
attribute_of = {i: name for name, ids in values.items() for i in ids}
texts, regions, asked = [], [], []
for i in range(int(sys.argv[2])):
    ids = tok(src.captions(i)[0])["input_ids"]
    place = 0
    for t, word in enumerate(tok.convert_ids_to_tokens(ids)):
        if word in (",", "and") and place != "rel":
            place += 1
        if word == ".":
            place = "rel"
        if ids[t] in attribute_of:
            masked = list(ids)
            masked[t] = tok.mask_token_id
            texts.append(tok.decode(masked[1:-1]))
            regions.append(src.region_set(i))
            asked.append((attribute_of[ids[t]], ids[t], place))
right = defaultdict(list)
with torch.inference_mode():
    for s in range(0, len(texts), 64):
        b = collate(texts[s : s + 64], regions[s : s + 64], tok)
        lang = model.encode(b)[0]
        logits = model.cls.predictions(lang, model.lxmert.embeddings.word_embeddings.weight)
        for j in range(len(lang)):
            pos = int((b.input_ids[j] == tok.mask_token_id).nonzero()[0])
            attribute, word, place = asked[s + j]
            best = values[attribute][int(logits[j, pos, values[attribute]].argmax())]
            right[(attribute, place)].append(best == word)
for (attribute, place), ok in sorted(right.items(), key=str):
    print(f"{attribute} {place}: {len(ok)}, {np.mean(ok):.3f}")
