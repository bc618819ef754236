"""Does a model tell a true caption from its relation-swapped twin ("above" -> "below")?

For the complete captions (every object listed, then one relation clause) and for the short
relation captions ("a green shape right of a teal triangle"), on images of a split:
  head ranking   how often the alignment head scores the true caption above its twin;
  linear probe   a logistic regression on the difference of the two captions' pooled
                 outputs (sign flipped at random), fit on train images, scored on test
                 ones: is the relation in the representation at all, used or not?

    python docs/experiments/cpu-continue-2/relation_probe.py STORE MODEL FEATURES DATA [N]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from service.data.collate import MAX_TEXT_TOKENS, collate
from service.store import ModelStore
from service.training.evaluate import load_model
from service.training.examples import PairSource
from service.training.negatives import hard_negatives, parse_caption


def pooled(model, batch) -> torch.Tensor:
    """The pooled vector the alignment head reads."""
    if model.kind == "lxmert":
        return model.encode(batch)[2]
    return model.fuse(model.encode(batch, model._task("match")))


def caption_pairs(source: PairSource, n: int, short: bool):
    """(texts, regions): true caption then its relation twin, for up to n images."""
    texts, regions = [], []
    for i in range(len(source)):
        captions = source.captions(i)
        pool = captions[1:] if short else captions[:1]
        pool = [c for c in pool if parse_caption(c).relation is not None]
        twins = hard_negatives(pool[0], source.objects(i), kinds=("relation",)) if pool else []
        if twins:
            texts += [pool[0], twins[0].text]
            regions += [source.region_set(i)] * 2
        if len(texts) >= 2 * n:
            break
    return texts, regions


@torch.no_grad()
def scores(model, tokenizer, texts, regions):
    feats, logits = [], []
    for k in range(0, len(texts), 64):
        batch = collate(texts[k : k + 64], regions[k : k + 64], tokenizer, MAX_TEXT_TOKENS)
        feats.append(pooled(model, batch).float())
        logits.append(model.match(batch).float())
    return torch.cat(feats), torch.cat(logits)


def probe(train: torch.Tensor, test: torch.Tensor, seed: int = 0) -> float:
    """Test accuracy of a logistic regression telling (true - twin) from (twin - true)."""
    g = torch.Generator().manual_seed(seed)

    def signed(x):
        d = x[0::2] - x[1::2]
        s = torch.randint(0, 2, (len(d),), generator=g).float()
        return d * (2 * s - 1)[:, None], s

    (xtr, ytr), (xte, yte) = signed(train), signed(test)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    w = torch.zeros(xtr.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        z = ((xtr - mu) / sd) @ w + b
        loss = F.binary_cross_entropy_with_logits(z, ytr) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((((xte - mu) / sd) @ w + b > 0).float() == yte).float().mean())


def main(store_root: str, ref: str, features: str, data: str, n: int = 300) -> None:
    torch.set_num_threads(1)
    store = ModelStore(store_root)
    model, tokenizer = load_model(store, store.resolve(ref))
    train = PairSource.load(data, features, "train")
    test = PairSource.load(data, features, "test")
    for short in (False, True):
        name = "short relation captions" if short else "complete captions"
        ftr, _ = scores(model, tokenizer, *caption_pairs(train, 2 * n, short))
        fte, lte = scores(model, tokenizer, *caption_pairs(test, n, short))
        ranking = float((lte[0::2] > lte[1::2]).float().mean())
        print(
            f"{ref} {name}: head ranking {ranking:.3f}, linear probe {probe(ftr, fte):.3f}"
            f" ({len(lte) // 2} test pairs)"
        )


if __name__ == "__main__":
    main(*sys.argv[1:5], *(int(a) for a in sys.argv[5:6]))
