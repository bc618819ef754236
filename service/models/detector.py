"""The region detector: torchvision's Faster R-CNN parts with an attribute head.

Both ViLBERT and LXMERT read an image as 10 to 36 regions from a Faster R-CNN, each a
pooled RoI feature and a box (the bottom-up-attention detector: Visual Genome objects
and attributes). `RegionDetector` composes torchvision's transform, backbone, region
proposal network and RoI heads the way `FasterRCNN` does, and adds:

- an attribute head beside the class head (here colour and size), trained on the
  positive proposals with the attributes of the ground truth they match;
- `extract(images)`: per image, 10 to 36 regions chosen as bottom-up chose them, each
  feature re-pooled from its final box so that feature, class and attributes all
  belong to that box;
- batching that never changes an image's regions: the tiny backbone zeroes the
  padding between blocks, the RPN only proposes from anchors centred on the image,
  and every batch carries one spare stride of padding (see `SpareStrideTransform`).

Backbones: "tiny" (a small CNN for CPU demos and tests) and "resnet50_fpn"
(torchvision's, built with no weights; a local ResNet-50 safetensors file can be
loaded, nothing is ever downloaded).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

from service.models.regions import Regions, lxmert_boxes, select_regions, vilbert_location

__all__ = [
    "DetectorConfig",
    "RegionDetector",
    "Regions",
    "lxmert_boxes",
    "vilbert_location",
]

IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]
COLORS = ["red", "green", "blue", "yellow", "black", "gray", "teal", "brown"]

# Defaults that depend on the backbone; a config field left at None takes these.
BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        min_size=128,
        max_size=256,
        representation_size=256,
        anchor_sizes=[[16, 32, 64, 128]],  # one feature map, stride 8
        rpn_pre_nms_top_n=1000,
        rpn_post_nms_top_n_train=300,
        rpn_post_nms_top_n_test=100,
        box_batch_size_per_image=64,  # at most 6 objects an image: 16 positives is plenty
        roi_sampling_ratio=0,  # adaptive: boxes span a few cells, one sample per cell
    ),
    "resnet50_fpn": dict(
        min_size=600,
        max_size=1000,
        representation_size=1024,
        anchor_sizes=[[32], [64], [128], [256], [512]],  # one size per FPN level
        rpn_pre_nms_top_n=1000,
        rpn_post_nms_top_n_train=2000,
        rpn_post_nms_top_n_test=300,
        box_batch_size_per_image=512,
        roi_sampling_ratio=2,
    ),
}


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a `RegionDetector`; JSON-safe via `dataclasses.asdict`.

    Fields left at None take the backbone's defaults (`BACKBONE_DEFAULTS`) when built,
    so the stored config always holds the values that were actually used.
    """

    backbone: str = "tiny"  # "tiny" | "resnet50_fpn"
    class_names: list[str] = field(default_factory=lambda: ["circle", "rectangle", "triangle"])
    num_classes: int = 3  # object classes, background not counted
    attributes: dict[str, list[str]] = field(
        default_factory=lambda: {"color": list(COLORS), "size": ["small", "large"]}
    )
    min_size: int | None = None  # transform: shorter side resized to this ...
    max_size: int | None = None  # ... unless the longer side would pass this
    representation_size: int | None = None  # box-head output = region feature size
    anchor_sizes: list[list[int]] | None = None  # per feature map
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n: int | None = None  # per feature map
    rpn_post_nms_top_n_train: int | None = None
    rpn_post_nms_top_n_test: int | None = None
    box_batch_size_per_image: int | None = None  # sampled RoIs per image in training
    roi_sampling_ratio: int | None = None  # RoIAlign samples per bin side, 0 = adaptive
    min_regions: int = 10
    max_regions: int = 36
    score_thresh: float = 0.2
    nms_thresh: float = 0.3
    backbone_weights: str | None = None  # resnet50_fpn only: a ResNet-50 safetensors file

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_DEFAULTS:
            raise ValueError(f"unknown backbone {self.backbone!r}; use {list(BACKBONE_DEFAULTS)}")
        for name, value in BACKBONE_DEFAULTS[self.backbone].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if not 0 < self.min_regions <= self.max_regions:
            raise ValueError(
                f"need 0 < min_regions <= max_regions, got {self.min_regions}, {self.max_regions}"
            )
        if self.backbone_weights is not None and self.backbone != "resnet50_fpn":
            raise ValueError("backbone_weights is only for the resnet50_fpn backbone")


# ---------------------------------------------------------------------------- backbones


class TinyBackbone(nn.Module):
    """A small conv-BN-ReLU stack: one feature map of 64 channels at stride 8.

    Receptive field about 85 px (with the RPN's 3x3 conv), enough for the shapes
    world's objects (15 to 51 px on a 128 canvas) and easy-VQA's shapes upscaled to
    128. After every block the
    activations outside each image's own area are zeroed, so the zeros that batching
    pads with look exactly like a lone image's border: an image gets the same
    features alone as in a batch of larger images.
    """

    # (out_channels, stride, dilation) per block
    blocks_spec = [
        (32, 2, 1),
        (64, 2, 1),
        (64, 1, 1),
        (64, 2, 1),
        (64, 1, 1),
        (64, 1, 2),  # dilated: widens the receptive field at no cost
    ]

    def __init__(self) -> None:
        super().__init__()
        layers, in_ch = [], 3
        for out_ch, stride, dilation in self.blocks_spec:
            layers.append(Conv2dNormActivation(in_ch, out_ch, 3, stride, dilation=dilation))
            in_ch = out_ch
        self.blocks = nn.ModuleList(layers)
        self.out_channels = in_ch
        self.strides = [s for _, s, _ in self.blocks_spec]
        self.stride = math.prod(self.strides)

    def forward(self, x: Tensor, image_sizes: list[tuple[int, int]] | None = None) -> Tensor:
        """(B, 3, H, W) normalised and padded -> (B, 64, H/8, W/8)."""
        step = 1
        for block, stride in zip(self.blocks, self.strides, strict=True):
            x = block(x)
            step *= stride
            if image_sizes is not None:
                x = x * valid_area_mask(image_sizes, step, x)
        return x


def valid_area_mask(image_sizes: list[tuple[int, int]], step: int, x: Tensor) -> Tensor:
    """(B, 1, h, w) mask, 1 where a stride-`step` map location lies on its image."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    masks = [
        (rows[:, None] < math.ceil(ih / step)) & (cols[None, :] < math.ceil(iw / step))
        for ih, iw in image_sizes
    ]
    return torch.stack(masks).unsqueeze(1).to(x.dtype)


def resnet50_fpn(weights_path: str | None) -> BackboneWithFPN:
    """torchvision's ResNet-50 FPN backbone, built with no weights (never downloads).

    With `weights_path`, a safetensors file of torchvision's `resnet50()` state dict
    (its ImageNet weights, what torchvision calls weights_backbone) is loaded strictly:
    every backbone tensor must be there and nothing else but the unused `fc.` layer.
    As torchvision does for a pretrained backbone, batch norm is then frozen and only
    the top three stages train.
    """
    pretrained = weights_path is not None
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50",
        weights=None,
        norm_layer=norm_layer,
        trainable_layers=3 if pretrained else 5,
    )
    if pretrained:
        state = load_file(weights_path)
        known = set(backbone.body.state_dict()) | {"fc.weight", "fc.bias"}
        unknown = sorted(k for k in state if k not in known and "num_batches_tracked" not in k)
        if unknown:
            raise ValueError(f"{weights_path} is not a ResNet-50 state dict: {unknown[:5]}")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        backbone.body.load_state_dict(state, strict=True)
    return backbone


def build_backbone(config: DetectorConfig) -> tuple[nn.Module, list[str], int]:
    """The feature extractor, the names of the maps RoIAlign pools, and the pad stride."""
    if config.backbone == "tiny":
        tiny = TinyBackbone()
        return tiny, ["0"], tiny.stride
    return resnet50_fpn(config.backbone_weights), ["0", "1", "2", "3"], 32


# --------------------------------------------------------------------- transform and RPN


class SpareStrideTransform(GeneralizedRCNNTransform):
    """torchvision's resize-normalise-batch, padding one stride past the largest image.

    RoIAlign clamps sample points that fall past a feature map's last row to that row,
    but interpolates towards zero where a padded row follows. One spare stride of
    padding makes every image see zeros there, alone or in a batch.
    """

    def resize(self, image: Tensor, target: dict[str, Any] | None = None):
        # Images already at the target scale (the shapes world's 128 px) skip the
        # identity interpolation.
        h, w = image.shape[-2:]
        scale = min(self.min_size[-1] / min(h, w), self.max_size / max(h, w))
        if scale == 1.0:
            return image, target
        return super().resize(image, target)

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        h = max(img.shape[-2] for img in images)
        w = max(img.shape[-1] for img in images)
        h = (math.ceil(h / size_divisible) + 1) * size_divisible
        w = (math.ceil(w / size_divisible) + 1) * size_divisible
        batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
        for img, slot in zip(images, batch, strict=True):
            slot[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batch


class ImageBoundedRPN(RegionProposalNetwork):
    """torchvision's RPN proposing only from anchors centred on their own image.

    Anchors over the batch padding get objectness -inf (so score 0, below the score
    floor) and the pre-NMS top-n keeps ties in anchor order: a lone image and the
    same image in a batch of larger ones get the same proposals.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.score_thresh = torch.finfo(torch.float32).tiny  # drops exactly-zero scores

    def _get_top_n_idx(self, objectness: Tensor, num_anchors_per_level: list[int]) -> Tensor:
        # A stable sort, not topk: flat backgrounds give many equal scores, and topk's
        # choice among them depends on how many anchors the batch has.
        picked, offset = [], 0
        for ob in objectness.split(num_anchors_per_level, 1):
            k = min(self.pre_nms_top_n(), ob.shape[1])
            picked.append(ob.sort(dim=1, descending=True, stable=True).indices[:, :k] + offset)
            offset += ob.shape[1]
        return torch.cat(picked, dim=1)

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        maps = list(features.values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(images, maps)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # (B*A, 1/4)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        outside = anchors_outside(anchors, images.image_sizes)  # (B, A)
        ranked = objectness.detach().view(len(anchors), -1).masked_fill(outside, -math.inf)
        boxes, _ = self.filter_proposals(
            proposals, ranked, images.image_sizes, num_anchors_per_level
        )
        if not self.training:
            return boxes, {}
        labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
        regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
        loss_objectness, loss_rpn_box_reg = self.compute_loss(
            objectness, deltas, labels, regression_targets
        )
        return boxes, {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}


def anchors_outside(anchors: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
    """(B, A) True where an anchor's centre lies past its image's (resized) size."""
    rows = []
    for a, (h, w) in zip(anchors, image_sizes, strict=True):
        cx = (a[:, 0] + a[:, 2]) / 2
        cy = (a[:, 1] + a[:, 3]) / 2
        rows.append((cx >= w) | (cy >= h))
    return torch.stack(rows)


# --------------------------------------------------------------------------- RoI heads


class AttributePredictor(nn.Module):
    """One linear classifier per attribute over the box head's representation."""

    def __init__(self, in_features: int, attributes: dict[str, list[str]]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(
            {name: nn.Linear(in_features, len(values)) for name, values in attributes.items()}
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(N, D) -> attribute name -> (N, V) logits."""
        return {name: head(x) for name, head in self.heads.items()}


class AttributeRoIHeads(RoIHeads):
    """torchvision's box RoI heads plus attributes, and bottom-up's region selection.

    Training: Fast R-CNN's class and box losses plus one cross-entropy per attribute
    on the positive RoIs, against the attributes of the ground truth each matched.
    Inference: each proposal's box is regressed for its best class and pooled again,
    so features, class probabilities and attributes describe the boxes returned; then
    per image `select_regions` picks min..max of these boxes by those probabilities. A
    region's label and score are the class it was kept for (its best class that
    survived per-class NMS) and that class's probability, as bottom-up ranks regions:
    a near-duplicate of a kept box, kept only to fill up to min_regions, scores low.
    """

    def __init__(
        self,
        box_roi_pool: MultiScaleRoIAlign,
        box_head: nn.Module,
        box_predictor: FastRCNNPredictor,
        attribute_predictor: AttributePredictor,
        batch_size_per_image: int,
        score_thresh: float,
        nms_thresh: float,
        min_regions: int,
        max_regions: int,
    ) -> None:
        super().__init__(
            box_roi_pool,
            box_head,
            box_predictor,
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=batch_size_per_image,
            positive_fraction=0.25,
            bbox_reg_weights=None,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=max_regions,
        )
        self.attribute_predictor = attribute_predictor
        self.min_regions = min_regions
        self.max_regions = max_regions

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Any]] | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
        if self.training:
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    def pooled(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """RoIAlign then the box head: (sum N, representation_size)."""
        return self.box_head(self.box_roi_pool(features, boxes, image_shapes))

    def losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Any]] | None,
    ) -> dict[str, Tensor]:
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
            proposals, targets
        )
        x = self.pooled(features, proposals, image_shapes)
        class_logits, box_regression = self.box_predictor(x)
        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets
        )
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        positive = torch.cat(labels) > 0
        for name, logits in self.attribute_predictor(x).items():
            per_image = zip(targets, matched_idxs, strict=True)
            target = torch.cat([matched_values(t["attributes"][name], m) for t, m in per_image])
            losses[f"loss_attr_{name}"] = attribute_loss(logits, target, positive)
        return losses

    def detect(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, Any]]:
        class_logits, box_regression = self.box_predictor(
            self.pooled(features, proposals, image_shapes)
        )
        boxes = self.box_coder.decode(box_regression, proposals)  # (sum N, C+1, 4)
        best = class_logits[:, 1:].argmax(dim=1) + 1  # (sum N,) best foreground class
        boxes = boxes[torch.arange(len(boxes), device=boxes.device), best]  # (sum N, 4)
        counts = [len(p) for p in proposals]
        candidates = [
            box_ops.clip_boxes_to_image(b, shape)
            for b, shape in zip(boxes.split(counts), image_shapes, strict=True)
        ]
        # Selecting on the probabilities of the re-pooled boxes keeps NMS and the
        # reported scores consistent: no duplicate that NMS removed comes back strong.
        found = self.describe(features, candidates, image_shapes)
        for d in found:
            n, c = d["class_probs"].shape[0], d["class_probs"].shape[1] - 1
            idx, cls = select_regions(
                d["boxes"][:, None, :].expand(n, c, 4),
                d["class_probs"][:, 1:],
                self.nms_thresh,
                self.score_thresh,
                self.min_regions,
                self.max_regions,
            )
            d["labels"] = cls + 1
            d["scores"] = d["class_probs"][idx, cls + 1]
            for key in ("boxes", "features", "class_probs"):
                d[key] = d[key][idx]
            d["attributes"] = {k: v[idx] for k, v in d["attributes"].items()}
        return found

    def describe(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Any]]:
        """Pool boxes again: features, classes and attributes of exactly these boxes
        (labels and scores here are the argmax; `detect` replaces them)."""
        x = self.pooled(features, boxes, image_shapes)  # (sum K, D)
        class_logits, _ = self.box_predictor(x)
        class_probs = F.softmax(class_logits, dim=-1)
        scores, labels = class_probs[:, 1:].max(dim=1)
        attributes = {n: F.softmax(v, dim=-1) for n, v in self.attribute_predictor(x).items()}
        counts = [len(b) for b in boxes]
        attributes = {n: v.split(counts) for n, v in attributes.items()}
        parts = zip(
            boxes,
            x.split(counts),
            class_probs.split(counts),
            (labels + 1).split(counts),
            scores.split(counts),
            strict=True,
        )
        return [
            dict(
                boxes=b,
                features=f,
                class_probs=p,
                labels=lab,
                scores=sc,
                attributes={n: v[i] for n, v in attributes.items()},
            )
            for i, (b, f, p, lab, sc) in enumerate(parts)
        ]


def matched_values(values: Tensor, matched_idxs: Tensor) -> Tensor:
    """Per-RoI attribute label of the ground truth it matched (0 for an image with none)."""
    if values.numel() == 0:
        return torch.zeros_like(matched_idxs)
    return values.to(matched_idxs.device)[matched_idxs]


def attribute_loss(logits: Tensor, target: Tensor, positive: Tensor) -> Tensor:
    """Cross-entropy over the positive RoIs whose attribute is known (label >= 0).

    Zero, with a graph, when there are none.
    """
    labelled = positive & (target >= 0)
    if not labelled.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled], target[labelled])


# ------------------------------------------------------------------------------- model


class RegionDetector(nn.Module):
    """Faster R-CNN with attributes that turns images into `Regions`.

    Composed like torchvision's `FasterRCNN`: transform, backbone, RPN and RoI heads
    are passed in; `from_config` builds them. `forward(images, targets)` returns the
    loss dict in training mode and `extract(images)` in eval mode.

    Images: a list of (3, H, W) float tensors in [0, 1], sizes may differ. Targets
    (training): per image a dict with boxes (N, 4) float pixels x1, y1, x2, y2, labels
    (N,) int64 in 1..num_classes, attributes {name: (N,) int64 value index, -1 where
    unknown (easy-VQA has no sizes): such objects teach that attribute nothing}.
    """

    def __init__(
        self,
        config: DetectorConfig,
        transform: GeneralizedRCNNTransform,
        backbone: nn.Module,
        rpn: RegionProposalNetwork,
        roi_heads: AttributeRoIHeads,
    ) -> None:
        super().__init__()
        self.config = config
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads

    @classmethod
    def from_config(cls, config: DetectorConfig | dict[str, Any]) -> RegionDetector:
        """Build from a config (or the dict `dataclasses.asdict` made of one)."""
        cfg = config if isinstance(config, DetectorConfig) else DetectorConfig(**config)
        backbone, map_names, pad_stride = build_backbone(cfg)
        channels = backbone.out_channels
        anchors = AnchorGenerator(
            tuple(tuple(s) for s in cfg.anchor_sizes),
            (tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes),
        )
        rpn = ImageBoundedRPN(
            anchors,
            RPNHead(channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n=dict(training=cfg.rpn_pre_nms_top_n, testing=cfg.rpn_pre_nms_top_n),
            post_nms_top_n=dict(
                training=cfg.rpn_post_nms_top_n_train, testing=cfg.rpn_post_nms_top_n_test
            ),
            nms_thresh=0.7,
        )
        pool = MultiScaleRoIAlign(map_names, output_size=7, sampling_ratio=cfg.roi_sampling_ratio)
        rep = cfg.representation_size
        roi_heads = AttributeRoIHeads(
            pool,
            TwoMLPHead(channels * 7 * 7, rep),
            FastRCNNPredictor(rep, cfg.num_classes + 1),
            AttributePredictor(rep, cfg.attributes),
            batch_size_per_image=cfg.box_batch_size_per_image,
            score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh,
            min_regions=cfg.min_regions,
            max_regions=cfg.max_regions,
        )
        transform = SpareStrideTransform(
            cfg.min_size, cfg.max_size, IMAGE_MEAN, IMAGE_STD, size_divisible=pad_stride
        )
        return cls(cfg, transform, backbone, rpn, roi_heads)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Any]] | None = None
    ) -> dict[str, Tensor] | list[Regions]:
        if not self.training:
            return self.extract(images)
        check_images(images)
        check_targets(targets, len(images), list(self.config.attributes))
        image_list, targets = self.transform(images, targets)
        features = self.features(image_list)
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        _, head_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {**rpn_losses, **head_losses}

    def features(self, images: ImageList) -> OrderedDict[str, Tensor]:
        """Backbone feature maps by name; the tiny backbone masks each image's padding."""
        if isinstance(self.backbone, TinyBackbone):
            return OrderedDict([("0", self.backbone(images.tensors, images.image_sizes))])
        return self.backbone(images.tensors)

    @torch.no_grad()
    def extract(self, images: list[Tensor]) -> list[Regions]:
        """Regions of each image, boxes in its original pixels (runs in eval mode).

        Each image yields min_regions..max_regions regions; fewer only if its RPN kept
        fewer than min_regions proposals, which a sane rpn_post_nms_top_n_test
        (default 100 or 300) makes impossible short of a degenerate, tiny image.
        """
        check_images(images)
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        with eval_mode(self):
            image_list, _ = self.transform(images)
            features = self.features(image_list)
            proposals, _ = self.rpn(image_list, features)
            found, _ = self.roi_heads(features, proposals, image_list.image_sizes)
            found = self.transform.postprocess(found, image_list.image_sizes, sizes)
        return [to_regions(d, size) for d, size in zip(found, sizes, strict=True)]


def to_regions(found: dict[str, Any], size: tuple[int, int]) -> Regions:
    return Regions(
        boxes=box_ops.clip_boxes_to_image(found["boxes"], size),
        features=found["features"],
        class_probs=found["class_probs"],
        labels=found["labels"],
        attributes=found["attributes"],
        scores=found["scores"],
        image_size=size,
    )


@contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode, then restore the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_images(images: list[Tensor]) -> None:
    if not images:
        raise ValueError("no images given")
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point():
            raise ValueError(
                f"image {i}: expected a float (3, H, W) tensor, got {tuple(img.shape)} {img.dtype}"
            )


def check_targets(targets: list[dict[str, Any]] | None, n: int, attributes: list[str]) -> None:
    if targets is None or len(targets) != n:
        raise ValueError(f"training needs one target dict per image ({n} images)")
    for i, t in enumerate(targets):
        boxes = t["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"target {i}: boxes must be float (N, 4), got {tuple(boxes.shape)}")
        if (boxes[:, 2:] <= boxes[:, :2]).any():
            raise ValueError(f"target {i}: every box needs x2 > x1 and y2 > y1")
        if t["labels"].dtype != torch.int64:
            raise ValueError(f"target {i}: labels must be int64")
        missing = set(attributes) - set(t.get("attributes", {}))
        if missing:
            raise ValueError(f"target {i}: no labels for attributes {sorted(missing)}")
