"""Masking for the pretraining objectives: pure functions of tensors and a generator.

- `mask_tokens`: BERT's masked LM. Each real, non-special token is chosen with `prob`;
  a chosen token becomes [MASK] (80%), a random vocabulary token (10%) or stays (10%).
- `mask_regions_vilbert`: ViLBERT's masked regions. Each real region is chosen with
  `prob`; `zero_prob` of the chosen ones are zeroed, the rest kept.
- `mask_regions_lxmert`: LXMERT's masked objects. Each real region is chosen with `prob`;
  a chosen one is zeroed (80%), replaced by another region's feature (10%) or kept (10%).

Every draw comes from the `torch.Generator` passed in, so a training step is
reproducible from its seed. Nothing here depends on a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label of a token that is not predicted (cross_entropy's default)


@dataclass(frozen=True)
class VocabInfo:
    """What token masking needs to know of a tokenizer."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]  # never chosen: [CLS], [SEP], [PAD], [UNK], [MASK]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> VocabInfo:
        return cls(
            mask_id=int(tokenizer.mask_token_id),
            vocab_size=len(tokenizer),
            special_ids=tuple(sorted(int(i) for i in tokenizer.all_special_ids)),
        )


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    vocab: VocabInfo,
    generator: torch.Generator | None = None,
    prob: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """BERT's 80/10/10 masking of (B, T) ids.

    Returns (masked_ids (B, T), labels (B, T)) where labels hold the original id at
    chosen positions and IGNORE_INDEX elsewhere. Special and padded positions are never
    chosen. Random replacements are drawn from the whole vocabulary, as BERT does.
    """
    special = torch.tensor(vocab.special_ids, dtype=input_ids.dtype, device=input_ids.device)
    maskable = (attention_mask == 1) & ~torch.isin(input_ids, special)
    chosen = _draw(input_ids.shape, generator, input_ids.device) < prob
    chosen &= maskable
    how = _draw(input_ids.shape, generator, input_ids.device)  # 80% mask, 10% random, 10% keep
    random_ids = torch.randint(
        vocab.vocab_size, input_ids.shape, generator=generator, device=input_ids.device
    ).to(input_ids.dtype)
    masked = input_ids.clone()
    masked[chosen & (how < 0.8)] = vocab.mask_id
    swap = chosen & (how >= 0.8) & (how < 0.9)
    masked[swap] = random_ids[swap]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


def mask_regions_vilbert(
    features: Tensor,
    region_mask: Tensor,
    generator: torch.Generator | None = None,
    prob: float = 0.15,
    zero_prob: float = 0.9,
) -> tuple[Tensor, Tensor]:
    """ViLBERT: choose real regions with `prob`; zero `zero_prob` of them, keep the rest.

    features (B, R, F), region_mask (B, R) -> (masked features (B, R, F), chosen (B, R) bool).
    """
    chosen = (_draw(region_mask.shape, generator, features.device) < prob) & (region_mask == 1)
    zeroed = chosen & (_draw(region_mask.shape, generator, features.device) < zero_prob)
    return features.masked_fill(zeroed.unsqueeze(-1), 0.0), chosen


def mask_regions_lxmert(
    features: Tensor,
    region_mask: Tensor,
    generator: torch.Generator | None = None,
    prob: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """LXMERT: choose real regions with `prob`; zero 80%, swap 10%, keep 10% of them.

    A swapped region takes the feature of another real region of the batch, drawn
    uniformly (the reference draws from the whole data set; the batch is our sample of
    it). features (B, R, F), region_mask (B, R) -> (masked (B, R, F), chosen (B, R) bool).
    """
    chosen = (_draw(region_mask.shape, generator, features.device) < prob) & (region_mask == 1)
    how = _draw(region_mask.shape, generator, features.device)
    masked = features.masked_fill((chosen & (how < 0.8)).unsqueeze(-1), 0.0)
    swap = chosen & (how >= 0.8) & (how < 0.9)
    real = region_mask.flatten().nonzero().squeeze(1)  # (N,) flat indices of real regions
    n = real.numel()
    if n > 1 and swap.any():
        # position of each real region in `real`; a swap picks another position uniformly
        position = torch.cumsum(region_mask.flatten() == 1, 0) - 1  # (B*R,)
        own = position[swap.flatten()]
        offset = torch.randint(1, n, own.shape, generator=generator, device=features.device)
        donors = real[(own + offset) % n]
        flat = masked.view(-1, features.shape[-1])
        flat[swap.flatten().nonzero().squeeze(1)] = features.reshape(-1, features.shape[-1])[donors]
    return masked, chosen


def _draw(shape, generator: torch.Generator | None, device) -> Tensor:
    """Uniform [0, 1) draws on `device` (the generator must live there too)."""
    return torch.rand(shape, generator=generator, device=device)
