"""Masking rates over large samples, and what is never masked."""

from __future__ import annotations

import pytest
import torch

from service.data.tokenizer import load_tokenizer
from service.training.masking import (
    IGNORE_INDEX,
    VocabInfo,
    mask_regions_lxmert,
    mask_regions_vilbert,
    mask_tokens,
)

TOL = 0.01  # ±1 point


@pytest.fixture(scope="module")
def vocab() -> VocabInfo:
    return VocabInfo.from_tokenizer(load_tokenizer())


def _token_batch(vocab: VocabInfo, b: int = 4000, t: int = 100, seed: int = 0):
    """[CLS] words [SEP] [PAD]..., lengths 10..t: about 200k real words."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab.vocab_size, (b, t), generator=g)
    lengths = torch.randint(10, t + 1, (b,), generator=g)
    pos = torch.arange(t).expand(b, t)
    attention = (pos < lengths[:, None]).long()
    ids[:, 0] = 101  # [CLS]
    ids[pos == (lengths[:, None] - 1)] = 102  # [SEP]
    ids[attention == 0] = 0  # [PAD]
    return ids, attention


def test_vocab_info_reads_the_tokenizer(vocab):
    tok = load_tokenizer()
    assert vocab.mask_id == tok.mask_token_id == 103
    assert vocab.vocab_size == 30522
    assert {0, 100, 101, 102, 103} <= set(vocab.special_ids)  # PAD UNK CLS SEP MASK


def test_token_masking_rates_and_80_10_10_split(vocab):
    ids, attention = _token_batch(vocab)
    masked, labels = mask_tokens(ids, attention, vocab, torch.Generator().manual_seed(1))
    words = (attention == 1) & (ids != 101) & (ids != 102)
    assert words.sum() > 150_000
    chosen = labels != IGNORE_INDEX
    assert abs(chosen[words].float().mean().item() - 0.15) < TOL
    # labels hold the original ids exactly where chosen
    assert torch.equal(labels[chosen], ids[chosen])
    n = chosen.sum().item()
    to_mask = (masked[chosen] == vocab.mask_id).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    swapped = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < TOL and abs(swapped - 0.1) < TOL and abs(kept - 0.1) < TOL
    # nothing unchosen changes
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_special_and_padded_tokens_are_never_chosen(vocab):
    ids, attention = _token_batch(vocab, b=400)
    _, labels = mask_tokens(ids, attention, vocab, torch.Generator().manual_seed(2), prob=0.9)
    chosen = labels != IGNORE_INDEX
    assert not chosen[attention == 0].any()
    assert not chosen[(ids == 101) | (ids == 102)].any()
    # a padded position holding a word id is still never chosen
    ids[attention == 0] = 5000
    _, labels = mask_tokens(ids, attention, vocab, torch.Generator().manual_seed(2), prob=0.9)
    assert not (labels[attention == 0] != IGNORE_INDEX).any()


def test_masking_is_reproducible_from_the_generator(vocab):
    ids, attention = _token_batch(vocab, b=50)
    a = mask_tokens(ids, attention, vocab, torch.Generator().manual_seed(3))
    b = mask_tokens(ids, attention, vocab, torch.Generator().manual_seed(3))
    c = mask_tokens(ids, attention, vocab, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def _regions(b: int = 8000, r: int = 36, f: int = 3, seed: int = 0):
    """Features whose column 0 is the region's flat index (so a donor is readable) and
    10..36 real regions per image: about 200k real regions."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, r, f, generator=g) + 5.0  # never zero
    feats[..., 0] = torch.arange(b * r, dtype=torch.float).view(b, r)
    counts = torch.randint(10, r + 1, (b,), generator=g)
    mask = (torch.arange(r).expand(b, r) < counts[:, None]).long()
    return feats, mask


def test_vilbert_region_rates(tmp_path):
    feats, mask = _regions()
    masked, chosen = mask_regions_vilbert(feats, mask, torch.Generator().manual_seed(5))
    real = mask == 1
    assert real.sum() > 150_000
    assert not chosen[~real].any()
    assert abs(chosen[real].float().mean().item() - 0.15) < TOL
    zeroed = (masked == 0).all(-1)
    assert abs(zeroed[chosen].float().mean().item() - 0.9) < TOL
    assert torch.equal(masked[chosen & ~zeroed], feats[chosen & ~zeroed])  # the other 10% kept
    assert torch.equal(masked[~chosen], feats[~chosen])


def test_lxmert_region_rates_and_swaps(tmp_path):
    feats, mask = _regions(seed=1)
    masked, chosen = mask_regions_lxmert(feats, mask, torch.Generator().manual_seed(6))
    real = mask == 1
    assert not chosen[~real].any()
    assert abs(chosen[real].float().mean().item() - 0.15) < TOL
    zeroed = (masked == 0).all(-1)
    kept = (masked == feats).all(-1)
    swapped = chosen & ~zeroed & ~kept
    n = chosen.sum().item()
    assert abs(zeroed[chosen].sum().item() / n - 0.8) < TOL
    assert abs(kept[chosen].sum().item() / n - 0.1) < TOL
    assert abs(swapped.sum().item() / n - 0.1) < TOL
    # a swapped region holds another real region's whole feature vector
    donors = masked[swapped][:, 0].long()
    assert mask.flatten()[donors].all()
    assert not torch.equal(donors, feats[swapped][:, 0].long())
    assert (donors != feats[swapped][:, 0].long()).all()
    assert torch.equal(masked[swapped], feats.flatten(0, 1)[donors])
    assert torch.equal(masked[~chosen], feats[~chosen])
