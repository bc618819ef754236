"""Fine-tuning for the service's tasks, from a pretrained store entry or from scratch.

Objectives (each samples its own batch of `batch_size` from the step's rng):

  vqa        multi-label classification over the answer vocabulary (the shapes world's
             ANSWERS; easy-VQA's 13 are a subset) against soft scores, BCE with logits
             averaged over batch and answers, times the number of answers, as both papers.
  match,     the alignment logit (`model.match`: higher = matched; each backbone's 2-way
  retrieval  head convention is inside it) with BCE on B images x (one true caption, one
             false caption). The false caption is a random negative (another image's
             caption, checked false for this image) or a hard negative (the true caption
             it is paired with, complete or partial, with one attribute, count or relation
             changed: short relation captions teach the relation words alone; the
             evaluation's hard negatives change the complete caption). Plus a symmetric
             InfoNCE loss between `embed_text` of the complete captions and `embed_image`
             of the regions across the batch (temperature 0.05; images whose complete
             captions are identical are not counted as each other's negatives): the
             gallery's first stage. "match" draws any caption as positive and half hard
             negatives; "retrieval" always the complete caption (the gallery's query) and
             a quarter hard negatives. With `Mix.word_check` (and a config with
             `word_check`), also a per-token loss: which words of a twin are the changed,
             false ones, and whether a caption's most suspect word is false
             (`word_check_loss`); `model.match` then vetoes a text with a false word.
  grounding  per-region logits (`model.ground`), softmax over the image's regions; the loss
             is -log of the probability on the regions whose box has IoU >= 0.5 with the
             referred object's (softmax cross-entropy with the best-IoU region as target,
             generalised to every region the evaluation would accept). Expressions with no
             such region (a detector miss) are left out of training.
  all        vqa, match and grounding in round robin, one per step: the one model that
             serves vqa, match, ground and retrieval.
  pretrain   the backbone's own pretraining losses (`pretrain.PRETRAIN_LOSSES`: masked
             words and regions, matching against random captions, LXMERT's QA), an extra
             objective of any task when `Mix.objectives` weighs it above 0. Masked words
             ask the text stream to tie each word to its object, which the task losses
             did not teach beyond the first objects of a caption
             (docs/experiments/diagnosis/). Its losses are logged as pre_*.

Each objective comes in two halves, `prepare(rng, n, device)` (draws, tokenising, collate,
targets, the copy to the device: no model) and `loss(model, prepared)`, so that the loop
can prepare the next step's batch while this one runs (`TrainConfig.prefetch`).

`label_fraction` keeps that fraction of the VQA training images (seeded); the other
objectives keep every image. Validation runs on the val split's features when they exist
(`val_images` images), and the best validation state is kept; VQA counts there only the
question families the mix draws (`make_evaluate`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.data.collate import MAX_TEXT_TOKENS, collate
from service.data.language import ANSWERS
from service.data.tokenizer import load_tokenizer
from service.models.backbone import EMBED_TEMPERATURE, Batch, build_backbone, match_claims
from service.store import Manifest, ModelStore
from service.training.calibrate import calibrate_model
from service.training.entries import freeze_external, write_model_entry
from service.training.evaluate import (
    easyvqa_source,
    eval_grounding,
    eval_match,
    eval_retrieval,
    eval_vqa,
)
from service.training.examples import PairSource, answer_targets, feature_path
from service.training.loop import TrainConfig, model_device, to_device, train
from service.training.metrics import paired_iou
from service.training.mix import Mix, item_weights, weighted_choice
from service.training.negatives import (
    by_kind,
    hard_negatives,
    pick_hard_negative,
    random_negative,
    turned_question,
)
from service.training.pretrain import PRETRAIN_LOSSES, PretrainData, default_config

TASKS = ("vqa", "retrieval", "grounding", "match", "all")
SERVES = {  # what the service may ask of a model fine-tuned on each task
    "vqa": ["vqa"],
    "match": ["match", "retrieval"],
    "retrieval": ["retrieval", "match"],
    "grounding": ["ground"],
    "all": ["vqa", "match", "ground", "retrieval"],
}
ROUND_ROBIN = ("vqa", "match", "grounding")  # the objectives of "all", one per step
PRETRAIN = "pretrain"  # the auxiliary objective a mix may add to any task
NUM_ANSWERS_KEY = {"vilbert": "num_answers", "lxmert": "num_qa_labels"}
NCE_TEMPERATURE = EMBED_TEMPERATURE
GROUND_IOU = 0.5
# (share of positives that are the complete caption, share of negatives that are hard)
ALIGN_MIX = {"match": (0.5, 0.5), "retrieval": (1.0, 0.25)}


# ---- objectives ---------------------------------------------------------------------------


def vqa_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """BCE with logits, mean over batch and answers, times the number of answers."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets) * targets.shape[1]


def info_nce(text: Tensor, image: Tensor, same: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE over a batch of (text i, image i) pairs.

    text, image (B, D) L2-normalised; same (B, B) bool marks pairs i != j whose texts are
    identical: they are left out of each other's denominators instead of being pushed apart.
    """
    sim = text.float() @ image.float().T / temperature  # (B, B)
    off = same & ~torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(off, float("-inf"))
    target = torch.arange(len(sim), device=sim.device)
    return (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2


def pair_rank_loss(logits: Tensor, pairs: Tensor) -> Tensor:
    """-log sigmoid(true - false), averaged over (true row, false row) pairs (K, 2): the
    two captions differ in one thing, so only that thing can move the gap."""
    return F.softplus(logits[pairs[:, 1]] - logits[pairs[:, 0]]).mean()


def changed_tokens(true_ids: Sequence[int], twin_ids: Sequence[int]) -> list[int]:
    """Positions in twin_ids of the tokens that differ from true_ids (an edit-script diff;
    where tokens were only deleted, the token after the gap)."""
    out: list[int] = []
    ops = difflib.SequenceMatcher(a=true_ids, b=twin_ids, autojunk=False).get_opcodes()
    for op, _, _, b0, b1 in ops:
        if op != "equal":
            out += list(range(b0, b1)) if b1 > b0 else [min(b0, len(twin_ids) - 1)]
    return out


def word_targets(pairs: Batch, labels: Tensor, rank_pairs: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token targets of the word check (P, T) and which tokens they hold for: every
    token of a true caption is 0; a twin's tokens are 1 where they differ from its true
    caption; a random false caption's tokens are unknown (any of them may be the false one)."""
    targets = torch.zeros(pairs.input_ids.shape)
    known = (pairs.attention_mask > 0) & (labels[:, None] > 0.5)
    for t, f in rank_pairs.tolist():
        n_true, n_twin = int(pairs.attention_mask[t].sum()), int(pairs.attention_mask[f].sum())
        true_ids = pairs.input_ids[t, :n_true].tolist()
        targets[f, changed_tokens(true_ids, pairs.input_ids[f, :n_twin].tolist())] = 1.0
        known[f, :n_twin] = True
    return targets, known


def word_check_loss(
    words: Tensor, targets: Tensor, known: Tensor, labels: Tensor, attention_mask: Tensor
) -> Tensor:
    """The word check's loss on its logits (P, T): BCE on the known tokens (`word_targets`)
    plus BCE of each caption's most suspect token, its max logit, against "the caption is
    false" (1 - labels (P,)), the decision `backbone.word_checked` makes. The second term
    holds for every false caption, random ones too (one of their words is false, which
    one unknown). Without it (the first term alone, changed words weighted 20x) the max
    over a long caption's tokens rose above 0: 757 steps from shapes-lxmert@3, validation
    random-negative matching fell from 89% to 12%, true captions called false."""
    words = words.float()
    token = F.binary_cross_entropy_with_logits(words[known], targets[known])
    worst = words.masked_fill(attention_mask == 0, torch.finfo(words.dtype).min).max(1).values
    caption = F.binary_cross_entropy_with_logits(worst, 1.0 - labels)
    return token + caption


def grounding_loss(logits: Tensor, good: Tensor) -> Tensor:
    """-log sum of softmax(logits) over the good regions, averaged: logits, good (B, R)."""
    logits = logits.float()
    right = torch.logsumexp(logits.masked_fill(~good, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - right).mean()


class Objective:
    """A fine-tuning objective in two halves; calling it prepares a batch and scores it."""

    def prepare(self, rng: np.random.Generator, n: int, device: torch.device):
        raise NotImplementedError

    def loss(self, model: nn.Module, prepared) -> dict[str, Tensor]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, rng: np.random.Generator, n: int) -> dict[str, Tensor]:
        return self.loss(model, self.prepare(rng, n, model_device(model)))


@dataclass
class VqaBatch:
    batch: Batch
    targets: Tensor  # (B, A) soft answer scores


@dataclass
class AlignBatch:
    pairs: Batch  # true and false captions with their images
    labels: Tensor  # (P,) 1 = matched
    images: Batch  # each image with its complete caption, for InfoNCE
    same: Tensor  # (B, B) bool, identical complete captions
    rank_pairs: Tensor  # (K, 2) rows of `pairs`: a true caption, its one-change twin
    word_targets: Tensor  # (P, T) 1 = a word of a twin that differs from its true caption
    word_known: Tensor  # (P, T) bool: true captions' and twins' tokens (not random ones')


@dataclass
class GroundBatch:
    batch: Batch
    good: Tensor  # (B, R) bool, regions with IoU >= GROUND_IOU with the referred object


class VqaObjective(Objective):
    """Questions of one or more PairSources: uniformly over all questions, or weighted by
    source, family and gold answer (`Mix.vqa_sources`, `vqa_families`, `vqa_answers`).
    With `Mix.vqa_turned`, yes/no relation questions bring their turned twins along."""

    def __init__(
        self,
        sources: list[PairSource],
        answers,
        tokenizer,
        max_length: int = MAX_TEXT_TOKENS,
        mix: Mix | None = None,
    ):
        self.sources, self.tokenizer, self.max_length = sources, tokenizer, max_length
        self.index = {a: k for k, a in enumerate(answers)}
        self.items = [
            (s, i, k)
            for s, src in enumerate(sources)
            for i in range(len(src))
            for k in range(len(src.questions(i)))
        ]
        if not self.items:
            raise ValueError("no questions to fine-tune VQA on")
        mix = mix or Mix()
        labels = []  # (source, family, answer) of each question
        for s, i, k in self.items:
            q = sources[s].questions(i)[k]
            labels.append(
                (sources[s].records[i].get("source", ""), q.get("family", ""), q["answer"])
            )
        self.weights = item_weights(labels, mix.vqa_sources, mix.vqa_families, mix.vqa_answers)
        self.turned = mix.vqa_turned

    def prepare(self, rng: np.random.Generator, n: int, device: torch.device) -> VqaBatch:
        texts, regions, targets = [], [], []
        for j in weighted_choice(self.weights, rng, n, len(self.items)):
            s, i, k = self.items[int(j)]
            region_set = self.sources[s].region_set(i)
            for question, answer in self._drawn(s, i, k, rng):
                texts.append(question)
                regions.append(region_set)
                targets.append(answer_targets(answer, self.index))
        batch = collate(texts, regions, self.tokenizer, self.max_length)
        return to_device(VqaBatch(batch, torch.stack(targets)), device)

    def _drawn(self, s: int, i: int, k: int, rng: np.random.Generator) -> list[tuple[str, str]]:
        """[(question, answer)]: the drawn question, and its turned twin when one is due."""
        q = self.sources[s].questions(i)[k]
        out = [(q["question"], q["answer"])]
        if self.turned > 0 and q.get("family") == "relation" and rng.random() < self.turned:
            if twin := turned_question(q["question"], self.sources[s].objects(i)):
                out.append(twin)
        return out

    def loss(self, model: nn.Module, prepared: VqaBatch) -> dict[str, Tensor]:
        loss = vqa_loss(model.answer(prepared.batch), prepared.targets)
        return {"loss": loss, "vqa": loss.detach()}


class AlignObjective(Objective):
    """Alignment BCE over true and false captions, plus InfoNCE on the dual embeddings."""

    def __init__(
        self,
        source: PairSource,
        tokenizer,
        complete_frac: float,
        hard_frac: float,
        max_length: int = MAX_TEXT_TOKENS,
        hard_kinds: dict[str, float] | None = None,
        rank_weight: float = 0.0,
        word_weight: float = 0.0,
        sentence_frac: float = 0.0,
    ):
        self.source, self.tokenizer, self.max_length = source, tokenizer, max_length
        self.word_weight, self.sentence_frac = word_weight, sentence_frac
        self.complete_frac, self.hard_frac = complete_frac, hard_frac
        self.hard_kinds = hard_kinds or None
        self.rank_weight = rank_weight
        self.images = [i for i in range(len(source)) if source.captions(i)]
        if len(self.images) < 2:
            raise ValueError("matching needs at least two images with captions")
        self.pool = [c for i in self.images for c in source.captions(i)]
        self._hard: dict[tuple[int, str], dict[str, list]] = {}

    def hard(self, i: int, caption: str, rng: np.random.Generator):
        """A one-change twin of `caption`, false for image i: a kind (uniformly or by
        `hard_kinds`), then a variant of that kind (cached per image and caption); None
        when the caption has none."""
        if (i, caption) not in self._hard:
            twins = hard_negatives(caption, self.source.objects(i))
            self._hard[i, caption] = by_kind(twins)
        return pick_hard_negative(self._hard[i, caption], rng, self.hard_kinds)

    def negative(self, i: int, caption: str, rng: np.random.Generator):
        """A false caption to pair with `caption`, a true one of image i (a `Negative`):
        with probability hard_frac a twin of it, else (or when it has no twin) another
        image's caption; None when neither exists."""
        if rng.random() < self.hard_frac and (twin := self.hard(i, caption, rng)) is not None:
            return twin
        return self.random(i, rng)

    def random(self, i: int, rng: np.random.Generator):
        return random_negative(self.source.objects(i), self.pool, rng)

    def positive(self, i: int, rng: np.random.Generator) -> str:
        """A true caption of image i: with probability sentence_frac one sentence of the
        complete caption alone (when it has several), else the complete caption with
        probability complete_frac, else any of the image's captions."""
        captions = self.source.captions(i)
        if self.sentence_frac and rng.random() < self.sentence_frac:
            if sentences := match_claims(captions[0])[1:]:
                return sentences[int(rng.integers(len(sentences)))]
        if rng.random() < self.complete_frac:
            return captions[0]
        return captions[int(rng.integers(len(captions)))]

    def prepare(self, rng: np.random.Generator, n: int, device: torch.device) -> AlignBatch:
        picks = rng.choice(self.images, size=min(n, len(self.images)), replace=False)
        regions = [self.source.region_set(int(i)) for i in picks]
        texts, pair_regions, labels, rank_pairs = [], [], [], []
        for i, rs in zip(picks, regions, strict=True):
            texts.append(self.positive(int(i), rng))
            pair_regions.append(rs)
            labels.append(1.0)
            if (neg := self.negative(int(i), texts[-1], rng)) is not None:
                if neg.kind != "random":  # a twin of the true caption: they differ in one thing
                    rank_pairs.append((len(texts) - 1, len(texts)))
                texts.append(neg.text)
                pair_regions.append(rs)
                labels.append(0.0)
        complete = [self.source.captions(int(i))[0] for i in picks]
        pairs = collate(texts, pair_regions, self.tokenizer, self.max_length)
        labels, rank_pairs = torch.tensor(labels), torch.tensor(rank_pairs, dtype=torch.long)
        rank_pairs = rank_pairs.reshape(-1, 2)
        targets, known = word_targets(pairs, labels, rank_pairs)
        prepared = AlignBatch(
            pairs=pairs,
            labels=labels,
            images=collate(complete, regions, self.tokenizer, self.max_length),
            same=torch.tensor([[a == c for c in complete] for a in complete]),
            rank_pairs=rank_pairs,
            word_targets=targets,
            word_known=known,
        )
        return to_device(prepared, device)

    def loss(self, model: nn.Module, prepared: AlignBatch) -> dict[str, Tensor]:
        logits, words = model.match_words(prepared.pairs)  # (P,), (P, T) or None
        logits = logits.float()
        match = F.binary_cross_entropy_with_logits(logits, prepared.labels)
        b = prepared.images
        text = model.embed_text(b.input_ids, b.attention_mask)
        image = model.embed_image(b.region_features, b.region_boxes, b.region_mask)
        nce = info_nce(text, image, prepared.same, NCE_TEMPERATURE)
        out = {"loss": match + nce, "match": match.detach(), "nce": nce.detach()}
        if self.rank_weight > 0 and len(prepared.rank_pairs):
            rank = pair_rank_loss(logits, prepared.rank_pairs)
            out["loss"] = out["loss"] + self.rank_weight * rank
            out["rank"] = rank.detach()
        if self.word_weight > 0:
            if words is None:
                raise ValueError("mix word_check needs a model whose config has word_check")
            word = word_check_loss(
                words,
                prepared.word_targets,
                prepared.word_known,
                prepared.labels,
                prepared.pairs.attention_mask,
            )
            out["loss"] = out["loss"] + self.word_weight * word
            out["words"] = word.detach()
        return out


class GroundObjective(Objective):
    """Referring expressions against the regions that overlap the referred object."""

    def __init__(self, source: PairSource, tokenizer, max_length: int = MAX_TEXT_TOKENS):
        self.source, self.tokenizer, self.max_length = source, tokenizer, max_length
        self.items = []  # (image, expression, good regions (R,) bool)
        for i in range(len(source)):
            boxes = source.region_set(i).boxes
            w, h = source.size(i)
            scale = torch.tensor([w, h, w, h], dtype=torch.float64)
            for ref in source.refexps(i):
                gt = torch.tensor(source.objects(i)[ref["index"]]["box"]) / scale
                good = paired_iou(boxes, gt.expand(len(boxes), 4)) >= GROUND_IOU
                if good.any():
                    self.items.append((i, ref["expression"], good))
        if not self.items:
            raise ValueError("no referring expression has a region with IoU >= 0.5")

    def prepare(self, rng: np.random.Generator, n: int, device: torch.device) -> GroundBatch:
        chosen = [self.items[int(j)] for j in rng.integers(len(self.items), size=n)]
        regions = [self.source.region_set(i) for i, _, _ in chosen]
        batch = collate([e for _, e, _ in chosen], regions, self.tokenizer, self.max_length)
        good = torch.zeros(batch.region_mask.shape, dtype=torch.bool)
        for row, (_, _, g) in enumerate(chosen):
            good[row, : len(g)] = g
        return to_device(GroundBatch(batch, good), device)

    def loss(self, model: nn.Module, prepared: GroundBatch) -> dict[str, Tensor]:
        loss = grounding_loss(model.ground(prepared.batch), prepared.good)
        return {"loss": loss, "ground": loss.detach()}


class PretrainObjective(Objective):
    """The backbone's pretraining losses as a fine-tuning objective (see the module doc)."""

    def __init__(self, kind: str, source: PairSource, tokenizer, max_length: int):
        self.data = PretrainData(kind, source, tokenizer, ANSWERS, max_length)
        self.loss_fn = PRETRAIN_LOSSES[kind]

    def prepare(self, rng: np.random.Generator, n: int, device: torch.device):
        return to_device(self.data.sample(rng, n), device)

    def loss(self, model: nn.Module, prepared) -> dict[str, Tensor]:
        out = self.loss_fn(model, *prepared)
        return {k if k == "loss" else f"pre_{k}": v for k, v in out.items()}


class RoundRobin:
    """The loop's step_loss: objective `cycle[step % len(cycle)]`, the cycle being the
    objectives in round robin, each repeated by its `Mix.objectives` weight. Split into
    `prepare` and `run` for the loop's prefetch."""

    def __init__(self, objectives: dict[str, Objective], batch_size: int, mix: Mix | None = None):
        self.objectives, self.batch_size = objectives, batch_size
        self.cycle = (mix or Mix()).cycle(list(objectives))

    def prepare(self, step: int, rng: np.random.Generator, device: torch.device) -> tuple:
        """(objective name, its prepared batch) for `step`."""
        name = self.cycle[step % len(self.cycle)]
        return name, self.objectives[name].prepare(rng, self.batch_size, device)

    def run(self, model: nn.Module, prepared: tuple) -> dict[str, Tensor]:
        name, batch = prepared
        return self.objectives[name].loss(model, batch)

    def __call__(self, model: nn.Module, step: int, rng: np.random.Generator) -> dict[str, Tensor]:
        return self.run(model, self.prepare(step, rng, model_device(model)))


def make_objectives(
    task: str,
    source: PairSource,
    tokenizer,
    vqa_sources: list[PairSource] | None = None,
    mix: Mix | None = None,
    max_length: int = MAX_TEXT_TOKENS,
    kind: str | None = None,
) -> dict[str, Objective]:
    """The objectives `task` trains, by name (ROUND_ROBIN's for "all"), over `source`;
    VQA over `vqa_sources` (default: [source]); and PRETRAIN when the mix weighs it, for
    the backbone `kind`."""
    mix = mix or Mix()
    out: dict[str, Objective] = {}
    for name in ROUND_ROBIN if task == "all" else (task,):
        if name == "vqa":
            out[name] = VqaObjective(vqa_sources or [source], ANSWERS, tokenizer, max_length, mix)
        elif name == "grounding":
            out[name] = GroundObjective(source, tokenizer, max_length)
        else:
            complete, hard = ALIGN_MIX[name]
            complete = complete if mix.complete_share is None else mix.complete_share
            hard = hard if mix.hard_share is None else mix.hard_share
            out[name] = AlignObjective(
                source,
                tokenizer,
                complete,
                hard,
                max_length,
                mix.hard_kinds,
                mix.align_rank,
                mix.word_check,
                mix.sentence_share,
            )
    if mix.objectives.get(PRETRAIN, 0) > 0:
        if kind not in PRETRAIN_LOSSES:
            raise ValueError(f"the {PRETRAIN} objective needs the backbone kind, not {kind!r}")
        out[PRETRAIN] = PretrainObjective(kind, source, tokenizer, max_length)
    return out


def make_step_loss(objectives: dict, batch_size: int, mix: Mix | None = None) -> RoundRobin:
    """The loop's step_loss over `objectives` (see `RoundRobin`)."""
    return RoundRobin(objectives, batch_size, mix)


# ---- validation -----------------------------------------------------------------------------


def make_evaluate(
    task: str, source: PairSource, answers, tokenizer, val_images: int, device, mix: Mix
):
    """evaluate(model) for the loop: flat validation metrics and their mean as "score".

    VQA is scored on the families the mix draws: a phase of one family alone (relation or
    count questions) is kept for what it trains, not for the others it lets slip; the
    accuracy over every family is then reported as "vqa_overall", outside the score.
    """
    objectives = ROUND_ROBIN if task == "all" else (task,)

    def evaluate(model: nn.Module) -> dict[str, float]:
        common = dict(batch_size=64, device=device, max_images=val_images)
        m: dict[str, float | None] = {}
        report: dict[str, float] = {}
        if "vqa" in objectives:
            vqa = eval_vqa(model, tokenizer, answers, source, **common)
            drawn = mix.drawn_families(list(vqa["by_family"]))
            if drawn == list(vqa["by_family"]):
                m["vqa_accuracy"] = vqa["overall"]
            else:
                m["vqa_accuracy"] = _pooled(vqa, drawn)
                report["vqa_overall"] = vqa["overall"]
        if {"match", "retrieval"} & set(objectives):
            out = eval_match(model, tokenizer, source, **common)
            m["match_random"] = out["random"]["accuracy"]
            m["match_hard"] = out["hard"]["accuracy"]
            r = eval_retrieval(
                model,
                tokenizer,
                source,
                val_images,
                rerank=5,
                align_queries=0,
                batch_size=64,
                device=device,
            )
            m["retrieval_r1"] = r["two_stage"]["R@1"]
        if "grounding" in objectives:
            m["grounding_accuracy"] = eval_grounding(model, tokenizer, source, **common)["accuracy"]
        kept = {k: float(v) for k, v in m.items() if v is not None}
        kept["score"] = float(np.mean(list(kept.values()))) if kept else 0.0
        return {**kept, **report}

    return evaluate


def _pooled(vqa: dict, families: list[str]) -> float | None:
    """Accuracy over the questions of `families` (`vqa_accuracy`'s per-family figures)."""
    n = {f: vqa["by_family_count"][f] for f in families if vqa["by_family_count"][f]}
    if not n:
        return None
    return sum(vqa["by_family"][f] * k for f, k in n.items()) / sum(n.values())


# ---- building the model ---------------------------------------------------------------------


def _init_model(
    store: ModelStore, init: str, backbone: str | None, source: PairSource, overrides: dict
) -> tuple[nn.Module, Manifest | None]:
    """A fresh model of `backbone` ("none") or the store entry `init`, with an answer head
    over ANSWERS (re-initialised when the entry's vocabulary differs)."""
    if init == "none":
        if backbone not in ("vilbert", "lxmert"):
            raise ValueError("init 'none' needs backbone 'vilbert' or 'lxmert'")
        first = source.regions(0)
        config = default_config(
            backbone,
            feature_dim=int(first.features.shape[-1]),
            num_classes=int(first.class_probs.shape[-1]),
            attributes={n: int(p.shape[-1]) for n, p in first.attributes.items()},
            num_answers=len(ANSWERS),
        )
        config.update(overrides)
        config[NUM_ANSWERS_KEY[backbone]] = len(ANSWERS)
        return build_backbone(backbone, config), None
    manifest = store.resolve(init)
    if backbone is not None and backbone != manifest.kind:
        raise ValueError(f"{manifest.ref} is a {manifest.kind}, not a {backbone}")
    if manifest.kind not in NUM_ANSWERS_KEY:
        raise ValueError(f"{manifest.ref} is a {manifest.kind}, not a vilbert or lxmert")
    config = {**manifest.config, **overrides, NUM_ANSWERS_KEY[manifest.kind]: len(ANSWERS)}
    model = build_backbone(manifest.kind, config)
    state = store.load_tensors(manifest)
    fresh = ()
    if list(manifest.answers or []) != list(ANSWERS):  # another vocabulary: a fresh classifier
        fresh = _answer_classifier_keys(model)
        state = {k: v for k, v in state.items() if k not in fresh}
    if overrides.get("word_check") and not manifest.config.get("word_check"):
        new = _word_check_keys(model)  # a word check the entry did not have: as built
        fresh += new
        state = {k: v for k, v in state.items() if k not in new}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != set(fresh):
        raise ValueError(f"{manifest.ref} does not fit its own config: {missing or unexpected}")
    if manifest.external:
        freeze_external(model, manifest.external)
    return model, manifest


def _word_check_keys(model: nn.Module) -> tuple[str, ...]:
    """State keys of the word-check head: LXMERT's own; ViLBERT's is its released
    per-token head (token_head), in every entry but untrained until a word check is on."""
    prefix = "token_head." if model.kind == "vilbert" else "extra_heads.word_check."
    return tuple(k for k in model.state_dict() if k.startswith(prefix))


def _answer_classifier_keys(model: nn.Module) -> tuple[str, ...]:
    """State keys of the answer head's last Linear: the layer sized by the vocabulary."""
    last = [n for n, m in model.answer_head.named_modules() if isinstance(m, nn.Linear)][-1]
    return tuple(
        f"answer_head.{last}.{p}"
        for p, _ in model.answer_head.get_submodule(last).named_parameters()
    )


def _detector(detector_ref, init: Manifest | None, sources: list[PairSource]) -> str | None:
    """The detector all regions and the initial model must share."""
    made_by = {s.features.meta.get("detector") for s in sources} - {None}
    named = detector_ref or (init.detector if init else None) or next(iter(made_by), None)
    if init and init.detector and init.detector != named:
        raise ValueError(f"{init.ref} was trained on {init.detector}'s regions, not {named}'s")
    if made_by - {named}:
        raise ValueError(f"features come from {sorted(made_by)}, expected {named}")
    return named


def _fraction(source: PairSource, fraction: float, rng: np.random.Generator) -> PairSource:
    if fraction >= 1.0:
        return source
    if fraction <= 0.0:
        raise ValueError("label_fraction must be in (0, 1]")
    keep = max(1, round(fraction * len(source)))
    return source.subset(sorted(rng.permutation(len(source))[:keep].tolist()))


# ---- run_finetune ---------------------------------------------------------------------------


def run_finetune(
    task: str,
    init: str = "none",
    *,
    backbone: str | None = None,
    features_dir: str | Path,
    data_dir: str | Path,
    store_root: str | Path,
    detector_ref: str | None = None,
    out_name: str | None = None,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 5e-5,
    seed: int = 0,
    label_fraction: float = 1.0,
    include_easyvqa: bool = False,
    config_overrides: dict | None = None,
    checkpoint_dir: str | None = None,
    device: str = "cpu",
    command: str = "",
    val_images: int = 100,
    eval_every: int | None = None,
    checkpoint_every: int = 200,
    max_length: int = MAX_TEXT_TOKENS,
    progress: bool = True,
    max_seconds: float = 0,
    mix: Mix | dict | str | None = None,
) -> Manifest:
    """Fine-tune for `task` and write a model_store entry; returns its manifest.

    task: "vqa" | "retrieval" | "grounding" | "match" | "all". init: "none" (a fresh
    `backbone` of the demo size, `pretrain.default_config`) or a store reference
    ("name" / "name@version") of a pretrained or fine-tuned entry. Training texts come
    from <data_dir>/train.jsonl, regions from <features_dir>/train.safetensors; with
    include_easyvqa, easy-VQA's train split (<features_dir>/easyvqa_train.safetensors)
    joins VQA. Validation uses <data_dir>/val.jsonl and <features_dir>/val.safetensors
    when both exist, every `eval_every` steps (default steps // 5); the entry keeps the
    best validation state and its metrics as "val/<name>". label_fraction keeps that share
    of the VQA training images. checkpoint_dir makes the run resumable. The entry holds
    history.json (the loop's per-step history) for `run_eval`'s training curves. `mix`
    weights objectives, VQA sources and families, and hard-negative kinds (`Mix.parse`).
    For "match" and "all", the match calibration is fitted on the whole validation split
    last (`calibrate.calibrate_model`) and kept in the manifest when it helps.
    """
    mix = Mix.parse(mix)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    store = ModelStore(store_root)
    rng = np.random.default_rng(seed)
    train_source = PairSource.load(data_dir, features_dir, "train")
    torch.manual_seed(seed)
    model, init_manifest = _init_model(
        store, init, backbone, train_source, dict(config_overrides or {})
    )
    if mix.word_check > 0 and not model.config.word_check:
        raise ValueError(
            "mix word_check needs the config's word_check: --config '{\"word_check\": true}'"
        )
    if mix.objectives.get(PRETRAIN, 0) > 0 and model.kind == "lxmert" and label_fraction < 1:
        raise ValueError(
            f"the {PRETRAIN} objective's QA loss reads every train question's answer: "
            "leave it out of a label_fraction run"
        )
    tokenizer = load_tokenizer()
    sources = [train_source]
    vqa_sources = None
    if task in ("vqa", "all"):
        vqa_sources = [_fraction(train_source, label_fraction, rng)]
        if include_easyvqa:
            vqa_sources.append(
                _fraction(easyvqa_source(features_dir, "train"), label_fraction, rng)
            )
        sources += vqa_sources[1:]
    objectives = make_objectives(
        task, train_source, tokenizer, vqa_sources, mix, max_length, model.kind
    )
    detector = _detector(detector_ref, init_manifest, sources)

    evaluate = None
    val = Path(data_dir) / "val.jsonl"
    if val.is_file() and feature_path(features_dir, "val").is_file():
        val_source = PairSource.load(data_dir, features_dir, "val")
        evaluate = make_evaluate(task, val_source, ANSWERS, tokenizer, val_images, device, mix)
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_every=eval_every if eval_every is not None else max(1, steps // 5),
        checkpoint_every=checkpoint_every if checkpoint_dir else 0,
        checkpoint_dir=checkpoint_dir,
        device=device,
        progress=progress,
        max_seconds=max_seconds,
    )
    result = train(
        model,
        make_step_loss(objectives, batch_size, mix),
        cfg,
        evaluate=evaluate,
        select_metric="score" if evaluate else None,
    )
    recipe = {
        "task": task,
        "init": init_manifest.ref if init_manifest else "none",
        "split": "train",
        "images": len(train_source),
        "vqa_images": [len(s) for s in objectives["vqa"].sources] if "vqa" in objectives else None,
        "data_dir": str(data_dir),
        "features": str(feature_path(features_dir, "train")),
        "label_fraction": label_fraction,
        "include_easyvqa": include_easyvqa,
        "seed": seed,
        "steps": steps,
        "steps_done": result.steps_done,
        "max_seconds": max_seconds,
        "batch_size": batch_size,
        "lr": lr,
        "max_length": max_length,
        "objectives": list(objectives),
        "align_mix": {k: ALIGN_MIX[k] for k in objectives if k in ALIGN_MIX},
        "mix": mix.to_dict(),
        "nce_temperature": NCE_TEMPERATURE,
    }
    metrics = {f"val/{k}": v for k, v in result.best_metrics.items()}
    calibration = None
    if evaluate is not None and task in ("match", "all"):
        calibration = calibrate_model(
            model.eval(),
            tokenizer,
            val_source,
            "val",
            seed,
            list(ANSWERS),
            device=device,
            progress=progress,
        )
    meta = dict(
        match_calibration=calibration,
        detector=detector,
        data=recipe,
        command=command,
        metrics=metrics,
        tasks=SERVES[task],
        answers=list(ANSWERS),
    )
    name = out_name or f"{model.kind}-{task}"
    return write_model_entry(store, name, model, result.history, **meta)
