"""Training examples: a split's records joined with its precomputed region features.

A `PairSource` holds, per image, the detector's regions (from the split's FeatureFile,
written by `vqa features`) and the texts of its record: captions, questions (with
answer and family), referring expressions and the ground-truth objects. Training code
samples (text, regions, targets) from it and turns them into a `Batch` with the one
`collate`. Feature files live at `<features_dir>/<split>.safetensors` (+ `.json`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from service.data.collate import RegionSet
from service.data.features import FeatureFile, ImageRegions
from service.data.records import load_records


def feature_path(features_dir: str | Path, split: str) -> Path:
    """Where the region features of `split` are: <features_dir>/<split>.safetensors."""
    return Path(features_dir) / f"{split}.safetensors"


class PairSource:
    """The images of one split: regions by index, plus each record's texts and objects.

    Only records that have regions in the feature file are kept, in record order.
    """

    def __init__(self, records: Sequence[dict], features: FeatureFile):
        have = set(features.ids)
        self.records = [r for r in records if r["id"] in have]
        if not self.records:
            raise ValueError(f"no record has regions in {features.path}")
        self.features = features
        self.ids = [r["id"] for r in self.records]

    @classmethod
    def load(cls, data_dir: str | Path, features_dir: str | Path, split: str) -> PairSource:
        """data_dir/<split>.jsonl joined with features_dir/<split>.safetensors."""
        return cls(load_records(data_dir, split), FeatureFile(feature_path(features_dir, split)))

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: Sequence[int]) -> PairSource:
        """The images at `indices` (e.g. a fraction of the labelled training images)."""
        return PairSource([self.records[i] for i in indices], self.features)

    def regions(self, i: int) -> ImageRegions:
        """The detector's regions of image i (features, boxes, class/attribute probs)."""
        return self.features.by_id(self.ids[i])

    def region_set(self, i: int) -> RegionSet:
        """Image i as a backbone reads it (float32 features, normalised boxes)."""
        return self.regions(i).region_set()

    def captions(self, i: int) -> list[str]:
        return list(self.records[i].get("captions") or [])

    def questions(self, i: int) -> list[dict]:
        """[{"question", "answer", "family"}, ...] of image i."""
        return list(self.records[i].get("questions") or [])

    def refexps(self, i: int) -> list[dict]:
        """[{"expression", "index"}, ...]; `index` points into objects(i)."""
        return list(self.records[i].get("refexps") or [])

    def objects(self, i: int) -> list[dict]:
        """Ground-truth objects [{"box" (pixels), "shape", "color", "size"}, ...]."""
        return list(self.records[i].get("objects") or [])

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) of image i in pixels."""
        return int(self.records[i]["width"]), int(self.records[i]["height"])

    def sentences(self, i: int) -> list[tuple[str, dict | None]]:
        """Every text of image i as LXMERT pretrains on them: captions (no question
        attached) and questions (with their {"question", "answer", "family"})."""
        return [(c, None) for c in self.captions(i)] + [
            (q["question"], q) for q in self.questions(i)
        ]


def other_image(n: int, i: int, rng: np.random.Generator) -> int:
    """A uniformly drawn index in range(n) other than i (needs n >= 2)."""
    if n < 2:
        raise ValueError("need at least two images to draw another one")
    return int((i + 1 + rng.integers(n - 1)) % n)


def other_caption(source: PairSource, i: int, rng: np.random.Generator, tries: int = 10) -> str:
    """A caption of ANOTHER image, for alignment negatives (the papers' random caption).

    Captions that are word for word among image i's own are redrawn (up to `tries`
    times); one that merely happens to be true of image i ("two shapes ...") can remain,
    as with the papers' random captions.
    """
    own = set(source.captions(i))
    text = ""
    for _ in range(tries):
        j = other_image(len(source), i, rng)
        captions = source.captions(j)
        if not captions:
            continue
        text = captions[int(rng.integers(len(captions)))]
        if text not in own:
            return text
    if not text:
        raise ValueError("no other image has a caption")
    return text


def other_sentence(source: PairSource, i: int, rng: np.random.Generator, tries: int = 10) -> str:
    """A caption or question of another image (LXMERT's mismatched sentence)."""
    own = {text for text, _ in source.sentences(i)}
    text = ""
    for _ in range(tries):
        sentences = source.sentences(other_image(len(source), i, rng))
        if not sentences:
            continue
        text = sentences[int(rng.integers(len(sentences)))][0]
        if text not in own:
            return text
    if not text:
        raise ValueError("no other image has a sentence")
    return text


def vqa_score(count: int) -> float:
    """VQA soft score of an answer given by `count` of the annotators (bottom-up's rule:
    0, 0.3, 0.6, 0.9, then 1 from four annotators on)."""
    return min(1.0, 0.3 * count) if count < 4 else 1.0


def answer_targets(
    answer: str | Sequence[str] | Mapping[str, float],
    answers: Sequence[str] | Mapping[str, int],
) -> Tensor:
    """Soft score vector (len(answers),) for multi-label VQA training with BCE.

    `answer` is one answer (score 1), the list of every annotator's answer (VQA's soft
    score per distinct answer) or a mapping answer -> score. Answers outside the
    vocabulary get no entry, as in VQA training (an all-zero row is allowed).
    """
    index = answers if isinstance(answers, Mapping) else {a: k for k, a in enumerate(answers)}
    target = torch.zeros(len(index))
    if isinstance(answer, str):
        scores = {answer: 1.0}
    elif isinstance(answer, Mapping):
        scores = dict(answer)
    else:
        counts: dict[str, int] = {}
        for a in answer:
            counts[a] = counts.get(a, 0) + 1
        scores = {a: vqa_score(c) for a, c in counts.items()}
    for a, score in scores.items():
        if a in index:
            target[index[a]] = float(score)
    return target


def pad_regions(regions: Sequence[ImageRegions], num_regions: int) -> dict[str, Tensor]:
    """Per-region detector outputs of B images, zero-padded to `num_regions` rows.

    Returns class_probs (B, R, C+1) and attr_<name> (B, R, K) as float32, matching the
    region order of `collate` (image b's regions first, padding after).
    """
    b = len(regions)
    first = regions[0]
    out = {"class_probs": torch.zeros(b, num_regions, first.class_probs.shape[-1])}
    for name, probs in first.attributes.items():
        out[f"attr_{name}"] = torch.zeros(b, num_regions, probs.shape[-1])
    for i, r in enumerate(regions):
        n = len(r.boxes)
        out["class_probs"][i, :n] = r.class_probs.float()
        for name, probs in r.attributes.items():
            out[f"attr_{name}"][i, :n] = probs.float()
    return out
