"""Does the shape word of the k-th listed object carry that object's colour and size?

A linear probe (softmax regression, fit on the complete captions of 2,000 train images)
reads the colour (8 values) and the size (2) of a listed object from the output vector of
its shape word ("circle", "triangles"), in the text stream alone and after the
cross-modal layers; judged on 1,000 test images by the object's place in the listing.
Objects named by a word that the tokenizer splits (teal, rectangle) are left out.

    python docs/experiments/diagnosis/binding_probe.py MODEL [STORE DATA FEATURES]
"""

import sys

import numpy as np
import torch

from service.data.collate import collate
from service.data.shapes import COLORS, SHAPES, SIZES
from service.store import ModelStore
from service.training.evaluate import load_model
from service.training.examples import PairSource

store_root, data, features = (
    sys.argv[2:5] if len(sys.argv) > 4 else ("model_store", "data/shapes", "data/features")
)
store = ModelStore(store_root)
model, tok = load_model(store, store.resolve(sys.argv[1]))
COLOR_NAMES = list(COLORS)
SHAPE_IDS = {tok.convert_tokens_to_ids(w + s) for w in SHAPES for s in ("", "s")}


def rows(split: str, n: int) -> list[tuple]:
    """(caption, regions, token index, listed object, colour index, is large)."""
    src = PairSource.load(data, features, split)
    out = []
    for i in range(n):
        caption = src.captions(i)[0]
        ids = tok(caption)["input_ids"]
        k, color, size = 0, None, None
        for t, word in enumerate(tok.convert_ids_to_tokens(ids)):
            if word == ".":  # the relation clause follows the listing
                break
            if word in (",", "and"):
                k, color, size = k + 1, None, None
            color = word if word in COLOR_NAMES else color
            size = word if word in SIZES else size
            if ids[t] in SHAPE_IDS and color is not None:
                large = size == "large"
                out.append((caption, src.region_set(i), t, k, COLOR_NAMES.index(color), large))
    return out


@torch.no_grad()
def vectors(items: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    text_only, cross = [], []
    for s in range(0, len(items), 64):
        chunk = items[s : s + 64]
        b = collate([c[0] for c in chunk], [c[1] for c in chunk], tok)
        if hasattr(model, "lxmert"):
            t, x = model.encode_text(b.input_ids, b.attention_mask), model.encode(b)[0]
        else:
            t = model.text_stream(b.input_ids, b.attention_mask)
            x = model.encode(b, model._task("match"))["sequence_output_t"]
        for j, c in enumerate(chunk):
            text_only.append(t[j, c[2]].float())
            cross.append(x[j, c[2]].float())
    return torch.stack(text_only), torch.stack(cross)


def probe(x_train, y_train, x_test, classes: int) -> np.ndarray:
    clf = torch.nn.Linear(x_train.shape[1], classes)
    opt = torch.optim.LBFGS(clf.parameters(), max_iter=300)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(clf(x_train), y_train)
        loss = loss + 1e-4 * clf.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return clf(x_test).argmax(1).numpy()


train, test = rows("train", 2000), rows("test", 1000)
place = np.array([r[3] for r in test])
streams = ("text alone", "cross-modal")
for stream, x_train, x_test in zip(streams, vectors(train), vectors(test), strict=True):
    for target, col, classes in (("colour", 4, len(COLOR_NAMES)), ("size", 5, 2)):
        y_test = np.array([r[col] for r in test])
        ok = probe(x_train, torch.tensor([int(r[col]) for r in train]), x_test, classes) == y_test
        by_place = {int(k): round(float(ok[place == k].mean()), 3) for k in sorted(set(place))}
        print(f"{stream} {target}: all {ok.mean():.3f}, by listed object {by_place}")
