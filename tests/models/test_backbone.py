"""The helpers both backbones share."""

from __future__ import annotations

import pytest
import torch

from service.data.collate import RegionSet, collate
from service.data.tokenizer import load_tokenizer
from service.models.backbone import (
    EMBED_TEMPERATURE,
    MAX_CLAIM_SENTENCES,
    UNANSWERABLE,
    MatchCalibration,
    build_backbone,
    claim_margins,
    expand_claims,
    least_per_text,
    match_claims,
    match_logits,
    match_parts,
    once_per_distinct_row,
    word_checked,
)
from tests.support import tiny_lxmert_config, tiny_vilbert_config


def test_once_per_distinct_row_computes_each_distinct_row_once_and_gathers_back():
    x = torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2], [5, 6]]).float() * 10
    seen = []

    def fn(rows):
        seen.append(rows.clone())
        return rows.sum(1, keepdim=True)

    out = once_per_distinct_row(fn, x)
    assert torch.equal(out, x.sum(1, keepdim=True))
    assert len(seen) == 1 and len(seen[0]) == 3  # [1, 2], [3, 4], [5, 6]


def test_once_per_distinct_row_passes_all_rows_when_none_repeats():
    x = torch.arange(6).view(3, 2)
    seen = []
    out = once_per_distinct_row(lambda r: seen.append(len(r)) or r * 2, x)
    assert torch.equal(out, x * 2) and seen == [3]


@pytest.mark.parametrize("kind", ["vilbert", "lxmert"])
def test_match_logits_are_the_head_or_its_calibrated_sum_with_the_cosine(kind):
    torch.manual_seed(0)
    config = (tiny_vilbert_config if kind == "vilbert" else tiny_lxmert_config)(12)
    model = build_backbone(kind, config).eval()
    images = [RegionSet(torch.randn(n, 12), torch.rand(n, 4).sort(-1).values) for n in (3, 5)]
    texts = ["a red circle", "two squares", "a blue triangle above a circle"]
    batch = collate(texts, [images[0], images[1], images[0]], load_tokenizer())
    with torch.no_grad():
        head = model.match(batch)
        text = model.embed_text(batch.input_ids, batch.attention_mask)
        image = model.embed_image(batch.region_features, batch.region_boxes, batch.region_mask)
        cosine = (text * image).sum(-1)
        assert torch.equal(match_logits(model, batch, None), head)
        got_head, got_cosine = match_parts(model, batch)  # images embedded once each
        assert torch.allclose(got_head, head) and torch.allclose(got_cosine, cosine, atol=1e-6)
        calibration = MatchCalibration.from_dict({"head": 0.5, "cosine": 2.0, "bias": -1.0})
        expected = 0.5 * head + 2.0 * cosine / EMBED_TEMPERATURE - 1.0
        assert torch.allclose(match_logits(model, batch, calibration), expected, atol=1e-5)
    assert MatchCalibration.from_dict(None) is None


def test_match_claims_are_the_text_and_each_of_its_sentences_when_it_has_several():
    listing = "a red circle and a blue square"
    relation = "the red circle is left of the blue square"
    text = f"{listing}. {relation}"
    assert match_claims(text) == [text, listing, relation]
    assert match_claims(f"{text}.") == [f"{text}.", listing, relation]
    assert match_claims("Is it red?  Yes!") == ["Is it red?  Yes!", "Is it red", "Yes"]
    for one in ("a red circle", "a red circle.", "3.5 circles", "a circle ... "):
        assert match_claims(one) == [one]
    many = ". ".join(f"sentence {i}" for i in range(20))
    claims = match_claims(many)
    assert claims[0] == many and claims[1:] == [f"sentence {i}" for i in range(MAX_CLAIM_SENTENCES)]


def test_expand_claims_and_least_per_text_give_each_text_its_least_claim():
    texts = ["one", "a. b", "c"]
    claims, owner = expand_claims(texts, by_sentence=False)
    assert claims == texts and owner.tolist() == [0, 1, 2]
    claims, owner = expand_claims(texts, by_sentence=True)
    assert claims == ["one", "a. b", "a", "b", "c"] and owner.tolist() == [0, 1, 1, 1, 2]
    logits = torch.tensor([0.5, 2.0, -1.0, 3.0, -0.25])
    assert least_per_text(logits, owner, 3).tolist() == [0.5, -1.0, -0.25]


@pytest.mark.parametrize("by_sentence", [False, True])
def test_match_calibration_reads_by_sentence_from_the_manifest(by_sentence):
    d = {"head": 1.0, "cosine": 0.0, "bias": 0.0}
    assert MatchCalibration.from_dict(d).by_sentence is False  # entries written before it
    assert MatchCalibration.from_dict({**d, "by_sentence": by_sentence}).by_sentence is by_sentence


def test_claim_margins_and_the_claims_cap():
    """A claim's margin is its stated answer's logit less the best other's; an answer the
    head lacks (-1) cannot be confirmed. The served logit is capped by the text's least
    margin less the threshold; a text without claims (+inf) keeps its logit."""
    logits = torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    margins = claim_margins(logits, torch.tensor([0, 1, -1]))
    assert margins.tolist() == [2.0, -2.0, UNANSWERABLE]
    d = {"head": 1.0, "cosine": 0.0, "bias": 0.0}
    assert MatchCalibration.from_dict(d).claims is None  # entries written before it
    calibration = MatchCalibration.from_dict({**d, "claims": -1.5})
    served = torch.tensor([4.0, 4.0, -3.0])
    capped = calibration.with_claims(served, torch.tensor([2.0, -2.0, float("inf")]))
    assert capped.tolist() == [3.5, -0.5, -3.0]
    assert MatchCalibration.from_dict(d).with_claims(served, torch.zeros(3)) is served


def test_word_checked_is_the_head_unless_a_word_of_the_text_is_false():
    head = torch.tensor([2.0, 2.0, -1.0, 3.0])
    words = torch.tensor(
        [
            [-5.0, -4.0, -6.0],  # no word false: the head decides
            [-5.0, 0.5, -6.0],  # one word false (logit 0.5): -0.5
            [-5.0, -4.0, -6.0],  # the head already says no
            [-5.0, -4.0, 9.0],  # 9.0 is padding, not a word
        ]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]])
    expected = torch.tensor([2.0, -0.5, -1.0, 3.0])
    assert torch.equal(word_checked(head, words, mask), expected)
    assert torch.equal(word_checked(head, None, mask), head)


@pytest.mark.parametrize("kind", ["vilbert", "lxmert"])
def test_match_asks_the_word_check_only_when_the_config_has_one(kind):
    config = (tiny_vilbert_config if kind == "vilbert" else tiny_lxmert_config)(12)
    images = [RegionSet(torch.randn(n, 12), torch.rand(n, 4).sort(-1).values) for n in (3, 5)]
    batch = collate(["a red circle", "two small squares"], images, load_tokenizer())
    for word_check in (False, True):
        torch.manual_seed(0)
        model = build_backbone(kind, {**config, "word_check": word_check}).eval()
        with torch.no_grad():
            head, words = model.match_words(batch)
            match = model.match(batch)
        assert head.shape == (2,)
        if not word_check:
            assert words is None and torch.equal(match, head)
            continue
        assert words.shape == batch.input_ids.shape  # one logit per token
        assert (words < 0).all()  # a fresh word check calls no word false
        assert torch.equal(match, word_checked(head, words, batch.attention_mask))
