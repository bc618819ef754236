"""The match calibration: its fit on hand-made pairs, and fit -> manifest -> eval."""

from __future__ import annotations

import pytest
import torch

from service.store import ModelStore
from service.training.calibrate import (
    EQUAL_WEIGHTS,
    fit_logistic,
    fit_match_calibration,
    run_calibrate,
)
from service.training.evaluate import MatchPairs, run_eval, served_logits
from tests.training.pretrain_support import write_tiny_split
from tests.training.test_evaluate import _entry

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_logistic_recovers_the_weights_that_drew_the_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g) * torch.tensor([3.0, 1.0]) + torch.tensor([1.0, 0.2])
    true_w, true_b = torch.tensor([0.8, -2.0]), 0.5
    y = (torch.rand(20000, generator=g) < torch.sigmoid(x @ true_w + true_b)).float()
    w, b = fit_logistic(x, y)
    assert torch.allclose(w.float(), true_w, atol=0.08) and b == pytest.approx(true_b, abs=0.15)


def _pairs(n: int) -> MatchPairs:
    """n images, each: caption (0), random negative (1), hard negative (2), partial (3)."""
    pairs = MatchPairs()
    for i in range(n):
        p = 4 * i
        pairs.texts += ["caption", "random", "hard", "partial"]
        pairs.positives.append(p)
        pairs.random.append((p, p + 1))
        pairs.hard.append((p, p + 2))
        pairs.kinds.append("color")
        pairs.partial.append(p + 3)
    return pairs


def test_calibration_adds_the_cosine_where_the_head_calls_hard_negatives_matches():
    """The head says match to captions, partial captions and hard negatives alike (logit
    +2, +2, +1.5) and rejects random ones; the cosine is highest for the complete caption,
    lower for a partial one, lower still for the hard negative. Alone the head gets every
    hard pair wrong; the fitted combination and its threshold get all right and still
    call every partial caption a match."""
    n = 40
    g = torch.Generator().manual_seed(1)
    per_text = torch.tensor([[2.0, 0.6], [-3.0, 0.1], [1.5, 0.3], [2.0, 0.45]]).repeat(n, 1)
    parts = per_text + 0.05 * torch.randn(4 * n, 2, generator=g)  # head logit, cosine
    calibration, accuracy = fit_match_calibration(parts, _pairs(n))
    assert accuracy["head"] == {"random": 1.0, "hard": 0.0, "partial": 1.0}
    assert accuracy["calibrated"] == {"random": 1.0, "hard": 1.0, "partial": 1.0}
    assert calibration.cosine > 0
    logit = calibration.logit(parts[:, 0], parts[:, 1]).view(n, 4)
    assert (logit[:, [0, 3]] > 0).all() and (logit[:, 1:3] < 0).all()  # threshold in the bias


def test_fit_checks_sentences_alone_where_that_tells_hard_negatives_apart():
    """Each image: a two-sentence caption, a random negative, a two-sentence hard negative
    whose second sentence is false, a partial caption. As whole texts the hard negative
    scores as the caption does (the head misreads the later sentence); its second
    sentence alone is rejected. Whole texts get no hard pair right; by sentence, all, and
    that is the calibration kept, with partial captions still matches."""
    n = 40
    caption, random, partial = [2.0, 0.6], [-3.0, 0.1], [2.0, 0.45]
    rows = [caption, caption, caption, random, caption, caption, [-2.0, 0.6], partial]
    owner = torch.tensor([0, 0, 0, 1, 2, 2, 2, 3])  # the text itself first, then sentences
    g = torch.Generator().manual_seed(2)
    parts = torch.tensor(rows).repeat(n, 1) + 0.05 * torch.randn(8 * n, 2, generator=g)
    owner = torch.cat([owner + 4 * i for i in range(n)])
    calibration, accuracy = fit_match_calibration(parts, _pairs(n), owner)
    assert accuracy["whole_text"]["hard"] <= 0.6
    assert accuracy["by_sentence"] == {"random": 1.0, "hard": 1.0, "partial": 1.0}
    assert calibration.by_sentence and accuracy["calibrated"] == accuracy["by_sentence"]

    whole_only = parts[owner.diff(prepend=torch.tensor([-1])) != 0]  # one row per text
    calibration, accuracy = fit_match_calibration(whole_only, _pairs(n))
    assert not calibration.by_sentence and "by_sentence" not in accuracy


def test_fit_checks_claims_where_the_vqa_head_tells_hard_negatives_apart():
    """The head and the cosine score the hard negative as the caption; the least claim
    margin is 3 for the caption, 1 for the partial caption, -4 for the hard negative, -6
    for the random one: checking claims gets every pair right and is kept, with a
    threshold between 1 and -4. Claims no better than the head are not kept."""
    n = 40
    g = torch.Generator().manual_seed(3)
    per_text = torch.tensor([[2.0, 0.6], [-3.0, 0.1], [2.0, 0.6], [2.0, 0.45]]).repeat(n, 1)
    parts = per_text + 0.05 * torch.randn(4 * n, 2, generator=g)
    claims = torch.tensor([3.0, -6.0, -4.0, 1.0]).repeat(n) + 0.1 * torch.randn(4 * n, generator=g)
    calibration, accuracy = fit_match_calibration(parts, _pairs(n), claims=claims)
    assert accuracy["whole_text"]["hard"] <= 0.6
    assert accuracy["claims"] == {"random": 1.0, "hard": 1.0, "partial": 1.0}
    assert accuracy["calibrated"] == accuracy["claims"] and -4 < calibration.claims < 1
    served = served_logits(calibration, parts, torch.arange(4 * n), claims).view(n, 4)
    assert (served[:, [0, 3]] > 0).all() and (served[:, 1:3] <= 0).all()

    unhelpful = torch.tensor([3.0, 3.0, 3.0, 3.0]).repeat(n)  # every claim confirmed
    calibration, accuracy = fit_match_calibration(parts, _pairs(n), claims=unhelpful)
    assert calibration.claims is None and accuracy["calibrated"] == accuracy["whole_text"]


def test_the_weights_choose_the_operating_point_where_hard_and_partial_overlap():
    """Hard negatives and partial captions score alike (head and cosine from one
    distribution): no threshold both rejects the one and accepts the other. Weighing
    hard pairs more rejects them (and partial captions with them); weighing partial
    captions more accepts them (and the hard negatives with them)."""
    n = 40
    g = torch.Generator().manual_seed(4)
    per_text = torch.tensor([[2.0, 0.6], [-3.0, 0.1], [1.0, 0.4], [1.0, 0.4]]).repeat(n, 1)
    parts = per_text + 0.05 * torch.randn(4 * n, 2, generator=g)
    _, strict = fit_match_calibration(parts, _pairs(n), weights={**EQUAL_WEIGHTS, "hard": 2})
    _, lenient = fit_match_calibration(parts, _pairs(n), weights={**EQUAL_WEIGHTS, "partial": 2})
    assert strict["calibrated"]["random"] == lenient["calibrated"]["random"] == 1.0
    assert strict["calibrated"]["hard"] >= 0.9 and strict["calibrated"]["partial"] <= 0.1
    assert lenient["calibrated"]["partial"] >= 0.9 and lenient["calibrated"]["hard"] <= 0.1


def test_fit_is_written_to_the_manifest_and_is_what_eval_uses(tmp_path):
    """A model whose head calls every caption a match: 0% of pairs right. The calibration
    fitted on val adds the embeddings' cosine; evaluated on the same split with the
    manifest's calibration, eval_match reproduces the fit's own accuracy."""
    data, features = write_tiny_split(tmp_path, "val", n=24)
    store = ModelStore(tmp_path / "store")
    m = _entry(store, "lxmert")
    with pytest.raises(ValueError, match="test"):
        run_calibrate(m.ref, store.root, features, data, split="test", progress=False)

    updated = run_calibrate(m.ref, store.root, features, data, split="val", progress=False)
    calibration = updated.match_calibration
    assert calibration is not None
    assert set(calibration) == {"head", "cosine", "bias", "by_sentence", "claims", "fitted_on"}
    fitted = calibration["fitted_on"]
    assert fitted["split"] == "val" and fitted["images"] == 24 and fitted["seed"] == 0
    assert fitted["weights"] == EQUAL_WEIGHTS
    assert fitted["accuracy"]["head"] == {"random": 0.0, "hard": 0.0, "partial": 1.0}
    assert store.resolve(m.ref).match_calibration == calibration
    store.verify(updated)  # the weights are untouched

    results = run_eval(
        m.ref,
        store.root,
        "match",
        features,
        data,
        split="val",
        out_dir=tmp_path / "out",
        progress=False,
    )
    match = results["match"]
    assert match["head"] == {"random": 0.0, "hard": 0.0}
    for neg in ("random", "hard"):
        assert match[neg]["accuracy"] == fitted["accuracy"]["calibrated"][neg]
    assert store.resolve(m.ref).metrics["val/match/head/hard"] == 0.0
