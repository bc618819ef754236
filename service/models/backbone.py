"""One interface for both backbones.

A `Batch` is what every backbone reads, built by the single collate function in
`service.data.collate`, so that what was trained is what is served. A
`VisionLanguageModel` is what the runtime and the training loops call; ViLBERT and
LXMERT both meet it. `build_backbone(kind, config)` rebuilds a model from the
config dict stored in a manifest, with nothing else needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The contrastive (InfoNCE) temperature the dual embeddings are trained with: cosine / T
# is their logit for "this caption is this image".
EMBED_TEMPERATURE = 0.05
# How much the alignment head's log-probability counts against that logit in the second
# stage of caption search; chosen on the validation split (docs/experiments/rerank.md).
RERANK_WEIGHT = 1.0


@dataclass
class Batch:
    """Token ids and region features for B (text, image) pairs.

    Boxes are normalised to [0, 1] (x1/W, y1/H, x2/W, y2/H); each backbone derives its
    own location encoding from them (ViLBERT's 5-d with area, LXMERT's 4-d box).
    Padded positions have mask 0 and must not change any output.
    """

    input_ids: Tensor  # (B, T) long
    attention_mask: Tensor  # (B, T) long, 1 = real token
    token_type_ids: Tensor  # (B, T) long
    region_features: Tensor  # (B, R, F) float
    region_boxes: Tensor  # (B, R, 4) float in [0, 1]
    region_mask: Tensor  # (B, R) long, 1 = real region

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move to a device; `dtype` casts the float tensors only."""
        moved = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            moved[f.name] = t.to(device)
        return replace(self, **moved)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@runtime_checkable
class VisionLanguageModel(Protocol):
    """What the service and the training loops call on a backbone.

    Every method takes a `Batch` (or its text / image half) and returns raw logits or
    embeddings; probabilities are the caller's business.
    """

    kind: str  # "vilbert" | "lxmert"

    def answer(self, batch: Batch) -> Tensor:
        """VQA logits over the answer vocabulary: (B, num_answers)."""

    def match(self, batch: Batch) -> Tensor:
        """Alignment logit that the text describes the image: (B,)."""

    def match_words(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """(alignment head logit (B,), per-token "this word is false of the image" logits
        (B, T), or None when the config has no word check): the parts of `match`."""

    def ground(self, batch: Batch) -> Tensor:
        """Per-region logits (B, R); padded regions hold the dtype's most negative value."""

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Single-modality text embedding, L2-normalised: (B, D)."""

    def embed_image(
        self, region_features: Tensor, region_boxes: Tensor, region_mask: Tensor
    ) -> Tensor:
        """Single-modality image embedding, L2-normalised: (B, D)."""


def two_stage_scores(cosine: Tensor, match_logits: Tensor, weight: float = RERANK_WEIGHT) -> Tensor:
    """Second-stage caption-search scores: the embeddings' logit cosine / T plus `weight`
    times log p(match) from the cross-attention alignment head (a product of experts).

    The head alone ranks near-duplicates (a changed relation or count) worse than the
    embeddings do; as a veto on top of them it lifts R@1 (docs/experiments/rerank.md)."""
    return cosine / EMBED_TEMPERATURE + weight * F.logsigmoid(match_logits)


# The word check's starting bias: a fresh check calls no word false (sigmoid(-4) = 0.018),
# so that adding it to a trained model leaves its match logits as they were at first.
WORD_CHECK_PRIOR = -4.0


def word_checked(head: Tensor, words: Tensor | None, attention_mask: Tensor) -> Tensor:
    """The match logit (B,) from the alignment head's logit (B,) and the word check's
    per-token logits (B, T): a text matches when the head says so and no word of it is
    false, min(head, -max over tokens). A caption is false when any one of its words is,
    which the pooled head alone reads poorly in long captions; the word check makes that
    "any" explicit (trained an hour on LXMERT it learnt no more than the head did:
    docs/experiments/word-check). No word check: the head alone."""
    if words is None:
        return head
    words = words.masked_fill(attention_mask == 0, torch.finfo(words.dtype).min)
    return torch.minimum(head, -words.max(dim=1).values)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim 1 of x (B, N, D) where mask (B, N) is 1; zero-safe."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def once_per_distinct_row(fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
    """fn(*inputs) computed once per distinct row of the inputs (each (B, ...)) and
    gathered back.

    For a single-modality stage of an eval-mode model fed repeating rows: a caption
    scored against 50 images (search's second stage), several questions about one
    image. Equal to fn(*inputs) up to float rounding, so only for fn without
    randomness (no dropout in training mode).
    """
    rows = torch.cat([x.reshape(len(x), -1).float() for x in inputs], 1)  # ids < 2**24
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if len(distinct) == len(rows):
        return fn(*inputs)
    positions = torch.arange(len(rows), device=rows.device)
    first = torch.full((len(distinct),), len(rows), dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, positions, "amin")  # a row standing for each
    return fn(*(x[first] for x in inputs))[inverse]


@dataclass(frozen=True)
class MatchCalibration:
    """How a pair's match logit is made from the alignment head and the dual embeddings.

    logit = head * head_logit + cosine * cos(text, image) / T + bias: a logistic fit on
    validation pairs (`service.training.calibrate`), its decision threshold folded into
    the bias so that logit > 0 (p > 0.5) is "match". The head alone misses near-duplicate
    captions that the embeddings tell apart (docs/experiments/match-calibration.md).
    With `by_sentence`, a text of several sentences is also checked sentence by sentence
    and gets the least logit (`match_claims`). With `claims` set, a text whose claims the
    caller can put as questions (`service.data.captions.claim_questions`) is also checked
    claim by claim by the VQA head: its logit is at most its least claim margin
    (`claim_margins`) less `claims` (docs/experiments/diagnosis/, section 12).
    """

    head: float
    cosine: float
    bias: float
    by_sentence: bool = False  # a text's logit: the least of its `match_claims`' logits
    claims: float | None = None  # the threshold on a text's least claim margin; None: unasked

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> MatchCalibration | None:
        """A manifest's `match_calibration` (None: the head's logit alone)."""
        if not d:
            return None
        by_sentence = bool(d.get("by_sentence", False))
        claims = None if d.get("claims") is None else float(d["claims"])
        head, cosine, bias = float(d["head"]), float(d["cosine"]), float(d["bias"])
        return cls(head, cosine, bias, by_sentence, claims)

    def logit(self, head_logit: Tensor, cosine: Tensor) -> Tensor:
        return self.head * head_logit + self.cosine * cosine / EMBED_TEMPERATURE + self.bias

    def with_claims(self, logits: Tensor, least_margin: Tensor) -> Tensor:
        """(N,) served logits (N,) capped by each text's least claim margin (N,) less the
        `claims` threshold; a text without claims (margin +inf) keeps its logit."""
        if self.claims is None:
            return logits
        return torch.minimum(logits, least_margin.to(logits) - self.claims)


def match_parts(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(alignment head logit, cosine of the text and image embeddings), each (B,) float.

    In eval mode the image embedding runs once per distinct image of the batch."""
    head = model.match(batch)
    text = model.embed_text(batch.input_ids, batch.attention_mask)  # (B, D)
    regions = (batch.region_features, batch.region_boxes, batch.region_mask)
    if model.training:
        image = model.embed_image(*regions)  # (B, D)
    else:  # one image scored against many texts: embedded once
        image = once_per_distinct_row(model.embed_image, *regions)
    return head.float(), (text * image).sum(-1).float()


MAX_CLAIM_SENTENCES = 8  # sentences of one text checked alone, at most
_SENTENCE_END = re.compile(r"[.!?]+(?:\s+|$)")


def match_claims(text: str) -> list[str]:
    """What a by-sentence calibration checks of a text: the text itself and, when it has
    two sentences or more, each of its first MAX_CLAIM_SENTENCES alone, without its full
    stop. A description of several sentences is true of an image only when every sentence
    is; the alignment head reads a long text's later sentences poorly and a short one well
    (docs/experiments/match-by-sentence/)."""
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
    return [text, *sentences[:MAX_CLAIM_SENTENCES]] if len(sentences) > 1 else [text]


def expand_claims(texts: Sequence[str], by_sentence: bool) -> tuple[list[str], Tensor]:
    """The texts to score and the index (C,) of the text each is of: the texts as they
    are, or with `by_sentence` every text's `match_claims` (the text itself first)."""
    if not by_sentence:
        return list(texts), torch.arange(len(texts))
    claims = [match_claims(t) for t in texts]
    owner = [i for i, c in enumerate(claims) for _ in c]
    return [c for cs in claims for c in cs], torch.tensor(owner, dtype=torch.long)


UNANSWERABLE = -100.0  # a claim's margin when the head has no such answer ("7 shapes")


def claim_margins(answer_logits: Tensor, expected: Tensor) -> Tensor:
    """(Q,) how firmly the VQA head gives each claim's stated answer: its logit less the
    best other answer's, from the answer logits (Q, A) and the stated answers' indices
    (Q,) (-1: not an answer the head has, UNANSWERABLE)."""
    known = expected >= 0
    index = expected.clamp(min=0)[:, None]
    stated = answer_logits.gather(1, index).squeeze(1)
    others = answer_logits.scatter(1, index, float("-inf")).max(1).values
    return torch.where(known, stated - others, torch.full_like(stated, UNANSWERABLE))


def least_per_text(logits: Tensor, owner: Tensor, n: int) -> Tensor:
    """(n,) the least of each text's claims' logits (C,) (`expand_claims`)."""
    out = logits.new_full((n,), float("inf"))
    return out.scatter_reduce(0, owner.to(logits.device), logits, "amin")


def match_logits(model: nn.Module, batch: Batch, calibration: MatchCalibration | None) -> Tensor:
    """The match logit (B,) as served: the head's, or its calibrated combination."""
    if calibration is None:
        return model.match(batch).float()
    return calibration.logit(*match_parts(model, batch))


def build_backbone(kind: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a backbone from a manifest's config dict alone."""
    if kind == "vilbert":
        from service.models.vilbert import ViLBertConfig, ViLBertModel

        return ViLBertModel(ViLBertConfig(**config))
    if kind == "lxmert":
        from service.models.lxmert import LxmertBackbone, LxmertBackboneConfig

        return LxmertBackbone(LxmertBackboneConfig(**config))
    raise ValueError(f"unknown backbone kind {kind!r}; expected 'vilbert' or 'lxmert'")
