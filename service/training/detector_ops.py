"""The detector's three commands: `vqa train detector`, `vqa eval detector`, `vqa features`.

- train: a fresh `RegionDetector` on the shapes world's train split (plus easy-VQA's
  train images whose shape the questions state), validated on the val split, stored
  as a model_store entry of kind "detector" (weights in float16: half the bytes, and
  `load_state_dict` casts them back into the float32 module);
- eval: mAP@0.5 per class, attribute accuracy and recall of objects among the kept
  regions on a shapes split, and on easy-VQA's test images how often the detector's
  best region is the one shape (IoU >= 0.5 with the box derived from the pixels);
- features: every image of a data set through the detector once, packed into
  `<out_dir>/<split>.safetensors` (`service.data.features`), which backbone training
  and evaluation read instead of running the detector again. easy-VQA's splits go to
  `easyvqa_train` and `easyvqa_test`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torchvision.ops import box_iou
from tqdm import tqdm

from service.data.features import ImageRegions, write_feature_file
from service.data.records import load_records
from service.models.detector import DetectorConfig, RegionDetector
from service.models.regions import Regions, lxmert_boxes
from service.store import Manifest, ModelStore
from service.training.detection_metrics import IOU, detection_metrics
from service.training.detector import record_image, train_detector, usable
from service.training.examples import feature_path

DEFAULT_NAME = "shapes-detector"
EASYVQA_SPLITS = ("train", "test")
WEIGHTS = "model.safetensors"


def _easyvqa(split: str) -> list[dict]:
    from service.data.easyvqa import load_split  # reads 1000s of PNG headers: only on demand

    return load_split(split)


# ----------------------------------------------------------------------------- train


def run_train_detector(
    data_dir: str | Path,
    store_root: str | Path,
    out_name: str = DEFAULT_NAME,
    config_overrides: dict | None = None,
    steps: int = 4000,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    include_easyvqa: bool = True,
    eval_every: int = 500,
    device: str = "cpu",
    command: str = "",
    progress: bool = True,
    half: bool = True,
) -> Manifest:
    """Train on <data_dir>/train.jsonl (+ easy-VQA train), keep the best val mAP@0.5.

    Image paths of records are relative to data_dir (easy-VQA's are absolute). The
    entry's metrics are the best validation's, prefixed "val/", and the run's
    "train/" figures (best_step, images, seconds, seconds_per_step).
    """
    config = DetectorConfig(**(config_overrides or {}))
    train_records = load_records(data_dir, "train")
    easy = _easyvqa("train") if include_easyvqa else []
    val_records = load_records(data_dir, "val")
    start = time.perf_counter()
    model, found = train_detector(
        train_records + easy,
        val_records,
        data_dir,
        config,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress=progress,
        eval_every=eval_every,
        device=device,
    )
    seconds = time.perf_counter() - start
    run_keys = ("best_step", "train_images", "seconds_per_step")
    metrics = {f"val/{k}": v for k, v in found.items() if k not in run_keys}
    metrics.update({f"train/{k}": v for k, v in found.items() if k in run_keys})
    metrics["train/seconds"] = seconds
    recipe = {
        "data_dir": str(data_dir),
        "train": "train.jsonl",
        "val": "val.jsonl",
        "shapes_train_images": len(train_records),
        "easyvqa_train_images": len(usable(easy, model.config)),
        "include_easyvqa": include_easyvqa,
        "val_images": len(val_records),
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "eval_every": eval_every,
        "device": device,
        "weights_dtype": "float16" if half else "float32",
    }
    return write_detector(store_root, out_name, model, metrics, recipe, command, half)


def write_detector(
    store_root: str | Path,
    name: str,
    model: RegionDetector,
    metrics: dict,
    data: dict,
    command: str = "",
    half: bool = True,
) -> Manifest:
    """Store the detector; its config (via asdict) rebuilds it with nothing else."""
    config = asdict(model.config)
    config["backbone_weights"] = None  # trained weights are in the entry, not a file path
    state = {
        k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()
    }
    return ModelStore(store_root).write(
        name,
        "detector",
        {WEIGHTS: state},
        config=config,
        data=data,
        command=command,
        metrics=metrics,
        tasks=["detect"],
    )


def load_detector(
    store_root: str | Path, ref: str, device: str = "cpu"
) -> tuple[RegionDetector, Manifest]:
    """(detector in eval mode, manifest) of a store entry, sha256s checked."""
    store = ModelStore(store_root)
    manifest = store.resolve(ref)
    if manifest.kind != "detector":
        raise ValueError(f"{manifest.ref} is a {manifest.kind}, not a detector")
    model = RegionDetector.from_config(manifest.config)
    model.load_state_dict(store.load_tensors(manifest, WEIGHTS))  # float16 -> float32 params
    return model.to(device).eval(), manifest


# ---------------------------------------------------------------------------- extract


def extract_all(
    model: RegionDetector,
    records: Sequence[dict],
    image_root: str | Path,
    batch_size: int = 16,
    desc: str = "detect",
    progress: bool = True,
) -> list[Regions]:
    """The regions of every record's image (on CPU), `batch_size` images per call."""
    device = next(model.parameters()).device
    out: list[Regions] = []
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        chunk = records[start : start + batch_size]
        images = [record_image(image_root, r).to(device) for r in chunk]
        out += [_cpu(r) for r in model.extract(images)]
    return out


def _cpu(r: Regions) -> Regions:
    return Regions(
        boxes=r.boxes.cpu(),
        features=r.features.cpu(),
        class_probs=r.class_probs.cpu(),
        labels=r.labels.cpu(),
        attributes={k: v.cpu() for k, v in r.attributes.items()},
        scores=r.scores.cpu(),
        image_size=r.image_size,
    )


# ------------------------------------------------------------------------------- eval


def shapes_metrics(
    model: RegionDetector, records: Sequence[dict], image_root: str | Path, **kw
) -> dict:
    """`detection_metrics` on the records whose objects all have known classes."""
    examples = usable(records, model.config)
    regions = extract_all(model, [r for r, _ in examples], image_root, **kw)
    cfg = model.config
    found = detection_metrics(
        regions, [t for _, t in examples], cfg.class_names, list(cfg.attributes)
    )
    return {"images": len(examples), **found}


def single_object_metrics(
    model: RegionDetector, records: Sequence[dict], image_root: str | Path = "", **kw
) -> dict:
    """On images of one object each (easy-VQA): is the best region that object?

    shape_found: the highest-scoring region overlaps the object's box at IoU >= 0.5
    (every image, stated shape or not); recall50: some kept region does; class_accuracy:
    the best region's class is the stated shape (images whose questions state it);
    plus `detection_metrics` (map50, color_accuracy, ...) on those images.
    """
    regions = extract_all(model, records, image_root, **kw)
    cfg = model.config
    found, covered, right, stated = 0, 0, [], []
    for i, (r, record) in enumerate(zip(regions, records, strict=True)):
        obj = record["objects"][0]
        ious = box_iou(r.boxes, torch.tensor([obj["box"]], dtype=torch.float32))[:, 0]  # (N,)
        top = int(r.scores.argmax())
        found += bool(ious[top] >= IOU)
        covered += bool(ious.max() >= IOU)
        if obj["shape"] in cfg.class_names:
            stated.append(i)
            right.append(int(r.labels[top]) == cfg.class_names.index(obj["shape"]) + 1)
    n = len(records)
    out = {
        "images": n,
        "shape_found": found / n,
        "recall50": covered / n,
        "stated_shape_images": len(stated),
        "class_accuracy": sum(right) / len(right) if right else None,
    }
    targets = [t for _, t in usable([records[i] for i in stated], cfg)]
    names = list(cfg.attributes)
    out.update(detection_metrics([regions[i] for i in stated], targets, cfg.class_names, names))
    return out


def run_eval_detector(
    model_ref: str,
    store_root: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    easyvqa: bool = True,
    out: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Score a stored detector on a shapes split (and easy-VQA test); write the json.

    data_dir defaults to the one it was trained on (its manifest's data recipe). The
    report goes to `out` (a .json file, or a folder to hold detector_metrics.json;
    default docs/experiments/<name>/) and, flattened as "<split>/<metric>" and
    "easyvqa_test/<metric>", into the entry's manifest metrics.
    """
    model, manifest = load_detector(store_root, model_ref, device)
    data_dir = data_dir if data_dir is not None else manifest.data.get("data_dir")
    if data_dir is None:
        raise ValueError(f"{manifest.ref} names no data_dir: pass one")
    kw = dict(batch_size=batch_size, progress=progress)
    start = time.perf_counter()
    report: dict = {"model": manifest.ref, "data_dir": str(data_dir), "split": split}
    report[split] = shapes_metrics(model, load_records(data_dir, split), data_dir, desc=split, **kw)
    if easyvqa:
        report["easyvqa_test"] = single_object_metrics(
            model, _easyvqa("test"), desc="easyvqa test", **kw
        )
    report["seconds"] = time.perf_counter() - start
    flat = {
        f"{part}/{k}": float(v)
        for part in (split, "easyvqa_test")
        for k, v in report.get(part, {}).items()
        if v is not None and "images" not in k
    }
    ModelStore(store_root).update_manifest(manifest, flat)
    path = _report_path(out, manifest.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    report["path"] = str(path)
    return report


def _report_path(out: str | Path | None, name: str) -> Path:
    if out is None:
        return Path("docs/experiments") / name / "detector_metrics.json"
    out = Path(out)
    return out if out.suffix == ".json" else out / "detector_metrics.json"


# --------------------------------------------------------------------------- features


def image_regions(r: Regions) -> ImageRegions:
    """A detector's `Regions` as stored for training: boxes normalised to [0, 1]."""
    h, w = r.image_size
    return ImageRegions(
        features=r.features.half(),  # (R, D); stored as float16 anyway
        boxes=lxmert_boxes(r.boxes, w, h).clamp(0.0, 1.0),  # (R, 4)
        class_probs=r.class_probs,
        attributes=r.attributes,
        scores=r.scores,
    )


def write_split_features(
    model: RegionDetector,
    records: Sequence[dict],
    image_root: str | Path,
    path: Path,
    meta: dict,
    batch_size: int = 16,
    progress: bool = True,
) -> Path:
    """Run the detector once per record and write the packed feature file."""
    regions = extract_all(model, records, image_root, batch_size, desc=path.stem, progress=progress)
    packed = [image_regions(r) for r in regions]
    return write_feature_file(path, [r["id"] for r in records], packed, meta)


def run_features(
    detector_ref: str,
    store_root: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    splits: Sequence[str] = ("train", "val", "test"),
    easyvqa: bool = True,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
) -> list[Path]:
    """Features of <data_dir>/<split>.jsonl for each split (+ easy-VQA train and test)."""
    model, manifest = load_detector(store_root, detector_ref, device)
    jobs = [(s, load_records(data_dir, s), data_dir, "shapes") for s in splits]
    if easyvqa:
        jobs += [(f"easyvqa_{s}", _easyvqa(s), "", "easy-vqa") for s in EASYVQA_SPLITS]
    written = []
    for name, records, root, source in jobs:
        meta = {
            "detector": manifest.ref,
            "split": name,
            "source": source,
            "data_dir": str(data_dir) if source == "shapes" else "easy_vqa package",
            "feature_size": model.config.representation_size,
            "class_names": list(model.config.class_names),
            "attributes": dict(model.config.attributes),
        }
        path = feature_path(out_dir, name)
        written.append(write_split_features(model, records, root, path, meta, batch_size, progress))
    return written
