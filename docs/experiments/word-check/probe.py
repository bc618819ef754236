"""Probe: can a per-token linear read of the cross-modal text outputs tell which word of a
one-change twin is false? Frozen model; fit on train twins, judged on test twins.

    python docs/experiments/word-check/probe.py MODEL TRAIN_IMAGES THREADS [DATA FEATURES]
"""

import json
import sys
import time

import numpy as np
import torch

from service.data.collate import collate
from service.store import ModelStore
from service.training.calibrate import fit_logistic
from service.training.evaluate import load_model
from service.training.examples import PairSource
from service.training.finetune import changed_tokens
from service.training.negatives import sample_hard_negative

torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
REF, N_TRAIN = sys.argv[1], int(sys.argv[2])
DATA, FEATURES = (
    (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else ("data/shapes", "data/features")
)
store = ModelStore("model_store")
model, tok = load_model(store, store.resolve(REF))
model.eval()


def changed(true_ids, twin_ids):
    lab = np.zeros(len(twin_ids), dtype=np.int64)
    lab[changed_tokens(true_ids, twin_ids)] = 1
    return lab


def triples(split, n, seed):
    src = PairSource.load(DATA, FEATURES, split)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(min(n, len(src))):
        caps, objs, rs = src.captions(i), src.objects(i), src.region_set(i)
        for cap in [caps[0]] + (
            [caps[1 + int(rng.integers(len(caps) - 1))]] if len(caps) > 1 else []
        ):
            hard = sample_hard_negative(cap, objs, rng)
            if hard is not None:
                out.append((cap, hard.text, hard.kind, rs, cap == caps[0]))
    return out


@torch.inference_mode()
def token_feats(texts, regions, bs=64):
    feats, mlm = [], []
    for s in range(0, len(texts), bs):
        b = collate(texts[s : s + bs], regions[s : s + bs], tok)
        if hasattr(model, "lxmert"):
            lang = model.encode(b)[0]
            logits = model.cls.predictions(lang, model.lxmert.embeddings.word_embeddings.weight)
        else:
            enc = model.encode(b, model._task("match"))
            lang = enc["sequence_output_t"]
            logits = None
        ids = b.input_ids
        for j in range(len(ids)):
            n = int(b.attention_mask[j].sum())
            feats.append(lang[j, :n].float())
            if logits is not None:
                lp = logits[j, :n].float().log_softmax(-1).gather(-1, ids[j, :n, None])[:, 0]
                mlm.append(lp)
    return feats, mlm


def build(split, n, seed):
    t = triples(split, n, seed)
    texts = [x for c, h, k, rs, full in t for x in (c, h)]
    regs = [rs for c, h, k, rs, full in t for _ in (0, 1)]
    t0 = time.time()
    feats, mlm = token_feats(texts, regs)
    print(split, len(t), "pairs", f"{time.time() - t0:.0f}s", flush=True)
    ids = [tok(x, truncation=True, max_length=64)["input_ids"] for x in texts]
    labels = []
    for k in range(len(t)):
        labels.append(np.zeros(len(ids[2 * k]), dtype=np.int64))
        labels.append(changed(ids[2 * k], ids[2 * k + 1]))
    return t, feats, mlm, labels


tr, ftr, _, ltr = build("train", N_TRAIN, 0)
te, fte, mte, lte = build("test", 1000, 1)


def inner(f):
    return f[1:-1]  # drop [CLS], [SEP]


X = torch.cat([inner(f) for f in ftr])
Y = torch.cat([torch.from_numpy(inner(lab)) for lab in ltr])
print("train tokens", len(X), "positive", int(Y.sum()), flush=True)
w, b = fit_logistic(X, Y.float(), l2=1e-3)


def cap_score(f):  # max token mismatch logit
    return float((inner(f).double() @ w + b).max())


s = np.array([cap_score(f) for f in fte]).reshape(-1, 2)
m = np.array([-float(inner(lp).min()) for lp in mte]).reshape(-1, 2) if mte else None
kinds = np.array([k for _, _, k, _, _ in te])
full = np.array([f for *_, f in te])
# threshold from train
str_ = np.array([cap_score(f) for f in ftr]).reshape(-1, 2)
ths = np.quantile(str_, np.linspace(0.01, 0.99, 197))


def acc(sc, th):
    return np.mean((sc[:, 0] < th) & (sc[:, 1] > th))


th = max(ths, key=lambda t: acc(str_, t))
res = {
    "model": REF,
    "train_pairs": len(tr),
    "test_pairs": len(te),
    "threshold": float(th),
    "train_acc": float(acc(str_, th)),
}
for name, sel in [("complete", full), ("partial", ~full)]:
    r = {
        "ranking": float(np.mean(s[sel, 1] > s[sel, 0])),
        "accuracy": float(acc(s[sel], th)),
        "true_ok": float(np.mean(s[sel, 0] < th)),
    }
    r["by_kind_ranking"] = {
        k: float(np.mean(s[sel & (kinds == k), 1] > s[sel & (kinds == k), 0]))
        for k in sorted(set(kinds))
    }
    r["by_kind_acc"] = {k: float(acc(s[sel & (kinds == k)], th)) for k in sorted(set(kinds))}
    if m is not None:
        r["mlm_ranking"] = float(np.mean(m[sel, 1] > m[sel, 0]))
        r["mlm_by_kind"] = {
            k: float(np.mean(m[sel & (kinds == k), 1] > m[sel & (kinds == k), 0]))
            for k in sorted(set(kinds))
        }
    res[name] = r
print(json.dumps(res, indent=1))
