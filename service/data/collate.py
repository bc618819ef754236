"""The one collate: (text, regions) pairs -> a model `Batch`.

Training and serving both call `collate`, so the tokenisation, padding and box
normalisation the model was trained on are exactly what it is served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from service.models.backbone import Batch


@dataclass
class RegionSet:
    """The regions of one image as a backbone reads them."""

    features: Tensor  # (R, F) pooled RoI features
    boxes: Tensor  # (R, 4) normalised x1/W, y1/H, x2/W, y2/H

    def __len__(self) -> int:
        return self.features.shape[0]


# Tokens kept of a text, [CLS] and [SEP] included: the shapes world's longest complete
# captions (six objects and a relation) take 50, so 64 never cuts a relation clause off.
MAX_TEXT_TOKENS = 64


def normalise_boxes(boxes: Tensor, width: int, height: int) -> Tensor:
    """Pixel boxes (R, 4) -> boxes in [0, 1] relative to the image size."""
    scale = boxes.new_tensor([width, height, width, height])
    return (boxes / scale).clamp(0.0, 1.0)


def collate(
    texts: Sequence[str],
    regions: Sequence[RegionSet],
    tokenizer,
    max_length: int = MAX_TEXT_TOKENS,
) -> Batch:
    """Tokenise texts and pad region sets into one `Batch` of len(texts) pairs.

    `regions[i]` is the image paired with `texts[i]`; pass the same RegionSet several
    times to ask several questions about one image.
    """
    if len(texts) != len(regions):
        raise ValueError(f"{len(texts)} texts but {len(regions)} region sets")
    enc = tokenizer(
        list(texts),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    input_ids = enc["input_ids"]
    attention_mask = enc["attention_mask"]
    token_type_ids = enc.get("token_type_ids", torch.zeros_like(input_ids))

    b = len(regions)
    r = max(len(rs) for rs in regions)
    f = regions[0].features.shape[-1]
    dtype = regions[0].features.dtype
    feats = torch.zeros(b, r, f, dtype=dtype)
    boxes = torch.zeros(b, r, 4, dtype=torch.float32)
    mask = torch.zeros(b, r, dtype=torch.long)
    for i, rs in enumerate(regions):
        n = len(rs)
        feats[i, :n] = rs.features
        boxes[i, :n] = rs.boxes.float()
        mask[i, :n] = 1
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        region_features=feats,
        region_boxes=boxes,
        region_mask=mask,
    )
