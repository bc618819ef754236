"""Tiny shapes-world splits with region features derived from the ground truth.

A stand-in for the detector's `vqa features` output that a tiny model can learn from:
one region per object whose feature encodes its shape, colour, size and position (plus
noise), and a few background regions; class and attribute distributions put 0.9 on the
truth. Records come from the real shapes-world generator (no images are rendered).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from service.data.features import ImageRegions, write_feature_file
from service.data.records import write_records
from service.data.shapes import COLORS, SHAPES, SIZES, generate_scene, scene_record, split_rng

FEATURE_DIM = 16
COLOR_NAMES = list(COLORS)
DETECTOR = "synthetic-detector@1"


def _soft(index: int, n: int, peak: float = 0.9) -> torch.Tensor:
    p = torch.full((n,), (1 - peak) / (n - 1))
    p[index] = peak
    return p


def synthetic_regions(record: dict, rng: np.random.Generator, n_background: int = 2):
    """ImageRegions for a record: its objects first, then background regions."""
    w, h = record["width"], record["height"]
    feats, boxes, classes, colors, sizes = [], [], [], [], []
    for o in record["objects"]:
        x1, y1, x2, y2 = o["box"]
        box = torch.tensor([x1 / w, y1 / h, x2 / w, y2 / h])
        f = torch.zeros(FEATURE_DIM)
        f[SHAPES.index(o["shape"])] = 1.0
        f[3 + COLOR_NAMES.index(o["color"])] = 1.0
        f[11 + SIZES.index(o["size"])] = 1.0
        f[13:15] = (box[:2] + box[2:]) / 2
        feats.append(f + 0.05 * torch.from_numpy(rng.standard_normal(FEATURE_DIM)).float())
        boxes.append(box)
        classes.append(_soft(1 + SHAPES.index(o["shape"]), 4))
        colors.append(_soft(COLOR_NAMES.index(o["color"]), 8))
        sizes.append(_soft(SIZES.index(o["size"]), 2))
    for _ in range(n_background):
        x1, y1 = rng.uniform(0, 0.6, 2)
        box = torch.tensor([x1, y1, x1 + 0.3, y1 + 0.3]).float()
        feats.append(0.05 * torch.from_numpy(rng.standard_normal(FEATURE_DIM)).float())
        boxes.append(box)
        classes.append(_soft(0, 4))
        colors.append(torch.full((8,), 1 / 8))
        sizes.append(torch.full((2,), 1 / 2))
    n = len(feats)
    return ImageRegions(
        features=torch.stack(feats),
        boxes=torch.stack(boxes),
        class_probs=torch.stack(classes),
        attributes={"color": torch.stack(colors), "size": torch.stack(sizes)},
        scores=torch.ones(n),
    )


def write_tiny_split(root: Path, split: str = "train", n: int = 48) -> tuple[Path, Path]:
    """Write data/<split>.jsonl and features/<split>.safetensors; returns (data, features)."""
    data_dir, features_dir = root / "data", root / "features"
    records = []
    for i in range(n):
        rng = split_rng(0, split, i)
        scene = generate_scene(rng, size=64)
        records.append(scene_record(scene, rng, f"images/{split}_{i:06d}.png", f"{split}_{i}"))
    write_records(data_dir / f"{split}.jsonl", records)
    rng = np.random.default_rng(0)
    regions = [synthetic_regions(r, rng) for r in records]
    write_feature_file(
        features_dir / f"{split}.safetensors",
        [r["id"] for r in records],
        regions,
        {"detector": DETECTOR},
    )
    return data_dir, features_dir


def tiny_overrides(kind: str) -> dict:
    """Hidden 32, one layer per stack; heads sized for the synthetic detector."""
    from service.data.language import ANSWERS
    from tests.support import tiny_lxmert_config, tiny_vilbert_config

    if kind == "vilbert":
        cfg = tiny_vilbert_config(FEATURE_DIM)
        cfg.update(num_hidden_layers=1, t_biattention_id=[1], v_target_size=4)
        cfg.update(num_answers=len(ANSWERS), hidden_dropout_prob=0.0, v_hidden_dropout_prob=0.0)
        return cfg
    cfg = tiny_lxmert_config(FEATURE_DIM)
    cfg.update(num_object_labels=3, num_attr_labels=10, num_qa_labels=len(ANSWERS))
    cfg.update(hidden_dropout_prob=0.0)
    return cfg
