"""A worker owns one device and the models on it; every model call runs on its thread.

The batchers hand it whole micro-batches: `detect` runs the detector on a list of
images of any sizes, `encode` runs one backbone on (task, text, regions) items,
grouped by task, through the shared collate.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from service.data.captions import expand_claim_questions
from service.data.collate import MAX_TEXT_TOKENS, RegionSet, collate, normalise_boxes
from service.data.tokenizer import load_tokenizer
from service.errors import NotFound
from service.models.backbone import (
    MatchCalibration,
    build_backbone,
    claim_margins,
    expand_claims,
    least_per_text,
    match_logits,
)
from service.models.detector import RegionDetector
from service.store import Manifest, ModelNotFound, ModelStore

log = logging.getLogger("vqa.worker")
# "match": the match logit as served (calibrated, by sentence, as the manifest says);
# "align": the alignment head's logit alone, which caption search's second stage reads.
TASKS = ("vqa", "match", "align", "ground", "embed_text")


@dataclass
class LoadedDetector:
    manifest: Manifest
    module: RegionDetector
    class_names: list[str]
    attributes: dict[str, list[str]]


@dataclass
class LoadedBackbone:
    manifest: Manifest
    module: torch.nn.Module
    tokenizer: object
    answers: list[str]
    detector: LoadedDetector
    calibration: MatchCalibration | None = None  # the manifest's; None: the head's logit


@dataclass
class DetectedRegions:
    """One image's regions on the CPU: what the cache keeps and responses show."""

    boxes: np.ndarray  # (N, 4) pixels
    features: torch.Tensor  # (N, F) float32
    labels: list[str]
    scores: np.ndarray  # (N,)
    attributes: list[dict[str, str]]
    width: int
    height: int
    region_set: RegionSet = field(init=False)

    def __post_init__(self) -> None:
        boxes = normalise_boxes(torch.from_numpy(self.boxes).float(), self.width, self.height)
        self.region_set = RegionSet(self.features, boxes)


@dataclass(frozen=True)
class EncodeItem:
    task: str  # one of TASKS
    text: str
    regions: RegionSet | None  # None for embed_text


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda was asked for, but no GPU is visible")
        return torch.device("cuda")
    return torch.device("cpu")


class Worker:
    def __init__(self, device: str = "auto"):
        self.device = pick_device(device)
        # fp16/bf16 on a GPU; float32 on the CPU, where half precision is slower.
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"worker-{self.device}"
        )

    # -- loading -------------------------------------------------------------------
    def load_detector(self, store: ModelStore, manifest: Manifest) -> LoadedDetector:
        module = RegionDetector.from_config(manifest.config)
        module.load_state_dict(store.load_tensors(manifest))
        module.to(self.device).eval()
        cfg = manifest.config
        return LoadedDetector(manifest, module, list(cfg["class_names"]), dict(cfg["attributes"]))

    def load_backbone(self, store: ModelStore, manifest: Manifest, detector: LoadedDetector):
        module = build_backbone(manifest.kind, manifest.config)
        module.load_state_dict(store.load_tensors(manifest))
        module.to(self.device, self.dtype).eval()
        tokenizer = load_tokenizer(str(manifest.path)) if manifest.tokenizer else load_tokenizer()
        calibration = MatchCalibration.from_dict(manifest.match_calibration)
        answers = list(manifest.answers or [])
        return LoadedBackbone(manifest, module, tokenizer, answers, detector, calibration)

    # -- inference (runs on the worker thread) --------------------------------------
    @torch.inference_mode()
    def detect(self, detector: LoadedDetector, images: list[Image.Image]) -> list[DetectedRegions]:
        tensors = [_to_tensor(im).to(self.device) for im in images]
        out = []
        for image, regions in zip(images, detector.module.extract(tensors), strict=True):
            out.append(_detected(detector, regions, *image.size))
        return out

    @torch.inference_mode()
    def encode(self, backbone: LoadedBackbone, items: list[EncodeItem]) -> list:
        results: list = [None] * len(items)
        for task in TASKS:
            idx = [i for i, it in enumerate(items) if it.task == task]
            if idx:
                outputs = self._run_task(backbone, task, [items[i] for i in idx])
                for i, o in zip(idx, outputs, strict=True):
                    results[i] = o
        return results

    def _run_task(self, backbone: LoadedBackbone, task: str, items: list[EncodeItem]) -> list:
        model = backbone.module
        if task == "embed_text":
            enc = backbone.tokenizer(
                [it.text for it in items],
                padding="longest",
                truncation=True,
                max_length=MAX_TEXT_TOKENS,
                return_tensors="pt",
            )
            emb = model.embed_text(
                enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            )
            return list(emb.float().cpu().numpy())
        if task == "match":
            return self._match(backbone, items)
        batch = collate(
            [it.text for it in items], [it.regions for it in items], backbone.tokenizer
        ).to(self.device, self.dtype)
        if task == "vqa":
            return list(model.answer(batch).float().cpu())
        if task == "align":
            return model.match(batch).float().cpu().tolist()
        logits = model.ground(batch).float().cpu()  # (B, R) padded
        return [row[: len(it.regions)] for row, it in zip(logits, items, strict=True)]

    def _match(self, backbone: LoadedBackbone, items: list[EncodeItem]) -> list[float]:
        """Match logits as served: calibrated, sentence by sentence and claim by claim, as
        the manifest says (`MatchCalibration`)."""
        calibration = backbone.calibration
        by_sentence = calibration is not None and calibration.by_sentence
        texts, owner = expand_claims([it.text for it in items], by_sentence)
        regions = [items[i].regions for i in owner.tolist()]
        batch = collate(texts, regions, backbone.tokenizer).to(self.device, self.dtype)
        logits = match_logits(backbone.module, batch, calibration).float().cpu()
        logits = least_per_text(logits, owner, len(items))
        if calibration is not None and calibration.claims is not None:
            logits = calibration.with_claims(logits, self._least_claim_margins(backbone, items))
        return logits.tolist()

    def _least_claim_margins(self, backbone: LoadedBackbone, items: list[EncodeItem]):
        """(N,) each text's least claim margin (`claim_margins`); +inf for a text
        without claims."""
        questions, expected, owner = expand_claim_questions(
            [it.text for it in items], backbone.answers
        )
        if not questions:
            return torch.full((len(items),), float("inf"))
        regions = [items[i].regions for i in owner]
        batch = collate(questions, regions, backbone.tokenizer).to(self.device, self.dtype)
        answers = backbone.module.answer(batch).float().cpu()
        margins = claim_margins(answers, torch.tensor(expected))
        return least_per_text(margins, torch.tensor(owner), len(items))

    @torch.inference_mode()
    def embed_images(self, backbone: LoadedBackbone, regions: list[RegionSet]) -> np.ndarray:
        batch = collate([""] * len(regions), regions, backbone.tokenizer).to(
            self.device, self.dtype
        )
        emb = backbone.module.embed_image(
            batch.region_features, batch.region_boxes, batch.region_mask
        )
        return emb.float().cpu().numpy()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def resolve(store: ModelStore, ref: str) -> Manifest:
    try:
        return store.resolve(ref)
    except ModelNotFound as exc:
        raise NotFound(str(exc)) from None


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _detected(detector: LoadedDetector, regions, width: int, height: int) -> DetectedRegions:
    labels = [detector.class_names[int(i) - 1] for i in regions.labels.cpu()]
    attrs: list[dict[str, str]] = [{} for _ in labels]
    for name, probs in regions.attributes.items():
        values = detector.attributes[name]
        for a, k in zip(attrs, probs.argmax(-1).tolist(), strict=True):
            a[name] = values[k]
    return DetectedRegions(
        boxes=regions.boxes.float().cpu().numpy(),
        features=regions.features.float().cpu(),
        labels=labels,
        scores=regions.scores.float().cpu().numpy(),
        attributes=attrs,
        width=width,
        height=height,
    )
