"""Precomputed region features of a whole data set, so training never runs the detector.

One safetensors file per split holds every image's regions packed end to end, with
`offsets` marking where each image starts; a JSON sidecar maps record ids to rows.
Loading is memory-mapped by safetensors, so a large split costs no copy until used.

Tensors in the file (N images, M regions in all):
  features     (M, F) float16  pooled RoI features
  boxes        (M, 4) float32  normalised x1/W, y1/H, x2/W, y2/H
  class_probs  (M, C+1) float16 detector class distribution, background at column 0
  attr_<name>  (M, K) float16  attribute distributions (e.g. attr_color, attr_size)
  scores       (M,) float32
  offsets      (N+1,) int64    image i owns rows offsets[i]:offsets[i+1]
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from service.data.collate import RegionSet


@dataclass
class ImageRegions:
    """The detector's view of one image, as stored for training."""

    features: torch.Tensor  # (R, F)
    boxes: torch.Tensor  # (R, 4) normalised
    class_probs: torch.Tensor  # (R, C+1)
    attributes: dict[str, torch.Tensor]  # name -> (R, K)
    scores: torch.Tensor  # (R,)

    def region_set(self) -> RegionSet:
        return RegionSet(self.features.float(), self.boxes.float())


class FeatureFile:
    """Read access to one split's packed regions: `len`, `ids`, `[i]`, `by_id(id)`."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.meta = json.loads(self.path.with_suffix(".json").read_text())
        self.tensors = load_file(str(self.path))
        self.offsets = self.tensors["offsets"]
        self.ids: list[str] = self.meta["ids"]
        self._row = {rid: i for i, rid in enumerate(self.ids)}
        self.attribute_names = [k[5:] for k in self.tensors if k.startswith("attr_")]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> ImageRegions:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        t = self.tensors
        return ImageRegions(
            features=t["features"][a:b],
            boxes=t["boxes"][a:b],
            class_probs=t["class_probs"][a:b],
            attributes={n: t[f"attr_{n}"][a:b] for n in self.attribute_names},
            scores=t["scores"][a:b],
        )

    def by_id(self, record_id: str) -> ImageRegions:
        return self[self._row[record_id]]


def write_feature_file(
    path: Path | str, ids: Sequence[str], regions: Sequence[ImageRegions], meta: dict
) -> Path:
    """Pack and write atomically (temp file, then rename); meta lands in the JSON sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = torch.tensor([0] + [len(r.boxes) for r in regions], dtype=torch.int64)
    tensors = {
        "features": torch.cat([r.features for r in regions]).to(torch.float16),
        "boxes": torch.cat([r.boxes for r in regions]).float(),
        "class_probs": torch.cat([r.class_probs for r in regions]).to(torch.float16),
        "scores": torch.cat([r.scores for r in regions]).float(),
        "offsets": torch.cumsum(sizes, 0),
    }
    for name in regions[0].attributes:
        tensors[f"attr_{name}"] = torch.cat([r.attributes[name] for r in regions]).half()
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    sidecar = path.with_suffix(".json")
    sidecar_tmp = sidecar.with_name(sidecar.name + ".tmp")
    sidecar_tmp.write_text(json.dumps({**meta, "ids": list(ids)}))
    os.replace(sidecar_tmp, sidecar)
    os.replace(tmp, path)
    return path
