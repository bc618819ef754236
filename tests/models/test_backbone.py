"""The helpers both backbones share."""

from __future__ import annotations

import torch

from service.models.backbone import once_per_distinct_row


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
