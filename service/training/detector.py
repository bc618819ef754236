"""Train the region detector on shapes-world (and easy-VQA) records.

Records are the JSON Lines format of `service.data.records`: per image a path and
objects [{box, shape, color, size}]. Each step draws `batch_size` records at random
(no augmentation: the shapes world is generated, not photographed), and every
`eval_every` steps the validation records are run through `extract` and scored with
mAP@0.5, recall of objects among the kept regions and attribute accuracy. The shared
loop (`service.training.loop`) does the optimisation, the progress bar and keeps the
weights of the best validation mAP.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from service.data.records import load_image
from service.models.detector import DetectorConfig, RegionDetector
from service.models.regions import Regions
from service.training.detection_metrics import detection_metrics
from service.training.loop import StepLoss, TrainConfig, model_device, train


def record_target(record: dict, config: DetectorConfig) -> dict | None:
    """A record's objects as a detector target; None when some object's class is unknown
    (easy-VQA states the shape only in some questions): such an image cannot teach
    what is background. Unknown attribute values become -1 and teach nothing."""
    objects = record["objects"]
    if any(o.get("shape") not in config.class_names for o in objects):
        return None
    boxes = torch.tensor([o["box"] for o in objects], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([config.class_names.index(o["shape"]) + 1 for o in objects])
    attributes = {
        name: torch.tensor(
            [values.index(o[name]) if o.get(name) in values else -1 for o in objects],
            dtype=torch.int64,
        )
        for name, values in config.attributes.items()
    }
    return {"boxes": boxes, "labels": labels.to(torch.int64), "attributes": attributes}


def record_image(image_root: str | Path, record: dict) -> Tensor:
    """(3, H, W) float in [0, 1], as the detector reads images."""
    pixels = np.asarray(load_image(image_root, record), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def usable(records: Sequence[dict], config: DetectorConfig) -> list[tuple[dict, dict]]:
    """(record, target) pairs of the records whose every object has a known class."""
    pairs = [(r, record_target(r, config)) for r in records]
    return [(r, t) for r, t in pairs if t is not None]


def _to(target: dict, device: torch.device) -> dict:
    attrs = {k: v.to(device) for k, v in target["attributes"].items()}
    return {**{k: target[k].to(device) for k in ("boxes", "labels")}, "attributes": attrs}


def detector_step_loss(
    examples: Sequence[tuple[dict, dict]], image_root: str | Path, batch_size: int
) -> StepLoss:
    """A step draws `batch_size` distinct examples from the loop's rng."""

    def step_loss(model: RegionDetector, step: int, rng: np.random.Generator) -> dict:
        device = model_device(model)
        picked = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
        images = [record_image(image_root, examples[i][0]).to(device) for i in picked]
        targets = [_to(examples[i][1], device) for i in picked]
        losses = model(images, targets)
        return {"loss": sum(losses.values()), **losses}

    return step_loss


@torch.no_grad()
def evaluate_detector(
    model: RegionDetector,
    examples: Sequence[tuple[dict, dict]],
    image_root: str | Path,
    batch_size: int = 16,
) -> dict[str, float | None]:
    """`detection_metrics` of the model's extracted regions on the examples."""
    device = model_device(model)
    regions = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        images = [record_image(image_root, r).to(device) for r, _ in chunk]
        regions += [_cpu(r) for r in model.extract(images)]
    targets = [t for _, t in examples]
    cfg = model.config
    return detection_metrics(regions, targets, cfg.class_names, list(cfg.attributes))


def _cpu(regions: Regions) -> Regions:
    return replace(
        regions,
        boxes=regions.boxes.cpu(),
        labels=regions.labels.cpu(),
        scores=regions.scores.cpu(),
        attributes={k: v.cpu() for k, v in regions.attributes.items()},
    )


def train_detector(
    train_records: Sequence[dict],
    val_records: Sequence[dict],
    image_root: str | Path,
    config: DetectorConfig | dict,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    eval_every: int = 0,
    device: str = "cpu",
) -> tuple[RegionDetector, dict[str, float]]:
    """Train a fresh detector; returns it (eval mode) at its best validation mAP@0.5.

    Metrics: the best evaluation's (map50, ap50_<class>, recall50, <attr>_accuracy),
    plus best_step, train_images (records usable for training) and seconds_per_step.
    """
    torch.manual_seed(seed)
    model = RegionDetector.from_config(config)
    train_examples = usable(train_records, model.config)
    val_examples = usable(val_records, model.config)
    if not train_examples or not val_examples:
        raise ValueError("no training or no validation records with known object classes")

    def evaluate(m: RegionDetector) -> dict[str, float]:
        found = evaluate_detector(m, val_examples, image_root)
        return {k: v for k, v in found.items() if v is not None}

    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=1e-4,
        clip_norm=10.0,
        seed=seed,
        eval_every=eval_every,
        device=device,
        progress=progress,
    )
    start = time.perf_counter()
    result = train(
        model, detector_step_loss(train_examples, image_root, batch_size), cfg, evaluate, "map50"
    )
    seconds = time.perf_counter() - start
    evals = [h for h in result.history if h["kind"] == "eval"]
    best = max(evals, key=lambda h: h.get("map50", -1.0))
    metrics = dict(result.best_metrics)
    metrics.update(
        best_step=float(best["step"]),
        train_images=float(len(train_examples)),
        seconds_per_step=seconds / max(1, steps),  # includes the evaluations
    )
    return result.model.eval(), metrics
