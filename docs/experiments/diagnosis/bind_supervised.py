"""Can LXMERT's language encoder (embeddings + its language layers, the shipped config,
random initialisation) learn to bind at all? Trained directly to name each shape word's
colour (the object it names), text only; accuracy on test complete captions by listed
object every 500 steps.

    python docs/experiments/diagnosis/bind_supervised.py [STEPS DATA FEATURES]
"""

import json
import sys
import time

import numpy as np
import torch
from torch import nn

from service.data.shapes import COLORS, SHAPES
from service.data.tokenizer import load_tokenizer
from service.models.backbone import build_backbone
from service.training.examples import PairSource

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 500
data, features = sys.argv[2:4] if len(sys.argv) > 3 else ("data/shapes", "data/features")
torch.set_num_threads(1)
torch.manual_seed(0)
tok = load_tokenizer()
COLOR_NAMES = list(COLORS)
SHAPE_IDS = {tok.convert_tokens_to_ids(w + s) for w in SHAPES for s in ("", "s")}


def rows(split: str) -> list[tuple[list[int], list[int], list[int]]]:
    """(token ids, colour label or -100, listed object or -1) per complete caption."""
    src = PairSource.load(data, features, split)
    out = []
    for i in range(len(src)):
        ids = tok(src.captions(i)[0])["input_ids"]
        label, place = [-100] * len(ids), [-1] * len(ids)
        k, color = 0, None
        for t, word in enumerate(tok.convert_ids_to_tokens(ids)):
            if word == ".":
                break
            if word in (",", "and"):
                k, color = k + 1, None
            color = word if word in COLOR_NAMES else color
            if ids[t] in SHAPE_IDS and color is not None:
                label[t], place[t] = COLOR_NAMES.index(color), k
        out.append((ids, label, place))
    return out


def batch(items):
    n = max(len(ids) for ids, _, _ in items)
    ids, mask = torch.zeros(len(items), n, dtype=torch.long), torch.zeros(len(items), n)
    label, place = torch.full((len(items), n), -100), torch.full((len(items), n), -1)
    for i, (a, lab, p) in enumerate(items):
        ids[i, : len(a)], mask[i, : len(a)] = torch.tensor(a), 1
        label[i, : len(a)], place[i, : len(a)] = torch.tensor(lab), torch.tensor(p)
    return ids, mask.long(), label, place


config = json.loads(open("model_store/shapes-lxmert/4/manifest.json").read())["config"]
model = build_backbone("lxmert", config)
head = nn.Linear(config["hidden_size"], len(COLOR_NAMES))
text = [*model.lxmert.embeddings.parameters(), *model.lxmert.encoder.layer.parameters()]
opt = torch.optim.AdamW([*text, *head.parameters()], 3e-4)
train, test = rows("train"), rows("test")
rng = np.random.default_rng(0)
start = time.time()


@torch.no_grad()
def accuracy_by_place() -> dict[int, float]:
    model.eval()
    ok: dict[int, list[bool]] = {}
    for s in range(0, len(test), 200):
        ids, mask, label, place = batch(test[s : s + 200])
        pred = head(model.encode_text(ids, mask)).argmax(-1)
        for k in range(int(place.max()) + 1):
            ok.setdefault(k, []).extend((pred[place == k] == label[place == k]).tolist())
    model.train()
    return {k: round(float(np.mean(v)), 3) for k, v in sorted(ok.items()) if v}


for step in range(1, steps + 1):
    ids, mask, label, _ = batch([train[i] for i in rng.integers(len(train), size=64)])
    logits = head(model.encode_text(ids, mask))
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), label.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 500 == 0:
        seconds = time.time() - start
        print(f"step {step}, {seconds:.0f} s, loss {loss.item():.3f}", accuracy_by_place())
