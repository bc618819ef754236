"""Evaluation of a model_store entry on a split: metrics.json, PNG plots, manifest metrics.

`run_eval` measures what the service does with a model, on region features computed
ahead by the detector (as LXMERT's evaluation did):

  vqa        accuracy of the top answer (argmax over the whole answer vocabulary), overall
             and per question family; with easy-VQA, the same on its test split.
  retrieval  text-to-image R@1/5/10 on a gallery of the split's first `gallery_size`
             images; the query is each image's complete caption (its first). Three
             rankings: "embed" (cosine of the single-modality embeddings alone), "align"
             (the alignment head scores every gallery image) and "two_stage" (what the
             gallery service does: embedding top-`rerank`, re-ordered by the alignment
             head, the rest left in embedding order). An image counts as right for a
             query when the query caption is true of it (`negatives.caption_holds`): the
             image itself, and any other whose objects the caption describes just as
             well (single-object scenes repeat), so a tie between two images that both
             fit the caption is no miss.
  grounding  the region with the highest grounding logit is right when its box has IoU
             >= 0.5 with the referred object's box; "upper_bound" is the share of
             expressions for which some region reaches 0.5 (the detector's ceiling).
  match      each image with its complete caption (positive) against one false caption
             (negative): a random one (another image's caption, checked false) and a hard
             one (one attribute, count or relation changed); see `metrics.match_accuracy`.
             "partial_positive_rate": the share of the images' other, partial captions
             (true too: "three shapes on a pastel background") called a match.
             Scored with the match logit as served: calibrated when the manifest holds a
             `match_calibration` (`service.training.calibrate`; sentence by sentence
             when it says `by_sentence`), the head's otherwise.

Store entries are immutable and checksummed, so nothing is written into the entry's
folder: metrics.json and the plots go to `out_dir` (default docs/experiments/<name>/),
and the numbers are merged into the manifest with `ModelStore.update_manifest` under flat
keys "<split>/<task>/...".
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from service.data.captions import expand_claim_questions
from service.data.collate import MAX_TEXT_TOKENS, RegionSet, collate
from service.data.language import FAMILIES
from service.data.tokenizer import load_tokenizer
from service.models.backbone import (
    Batch,
    MatchCalibration,
    build_backbone,
    claim_margins,
    expand_claims,
    least_per_text,
    match_parts,
    two_stage_scores,
)
from service.store import Manifest, ModelStore
from service.training.examples import PairSource, feature_path
from service.training.metrics import (
    grounding_accuracy,
    match_accuracy,
    paired_iou,
    recall_at_k,
    vqa_accuracy,
)
from service.training.negatives import caption_holds, random_negative, sample_hard_negative
from service.training.plots import plot_family_accuracy, plot_training_curves

EVAL_TASKS = ("vqa", "retrieval", "grounding", "match")
KS = (1, 5, 10)


# ---- batched inference ------------------------------------------------------------------


def _chunks(n: int, size: int, desc: str, progress: bool):
    starts = range(0, n, size)
    return tqdm(starts, desc=desc, unit="batch", disable=not progress or n <= size, leave=False)


@torch.inference_mode()
def pair_scores(
    model: nn.Module,
    tokenizer,
    method: str | Callable[[Batch], Tensor],
    texts: Sequence[str],
    regions: Sequence[RegionSet],
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = False,
) -> Tensor:
    """model.<method>(batch) (or method(batch)) over every (text, regions) pair, on CPU:
    "answer" gives (N, num_answers) logits, "match" (N,) logits."""
    fn = getattr(model, method) if isinstance(method, str) else method
    desc = method if isinstance(method, str) else getattr(method, "__name__", "pairs")
    out = [torch.zeros(0)]
    for s in _chunks(len(texts), batch_size, desc, progress):
        batch = collate(texts[s : s + batch_size], regions[s : s + batch_size], tokenizer)
        out.append(fn(batch.to(device)).float().cpu())
    return torch.cat(out) if len(out) > 1 else out[0]


@torch.inference_mode()
def ground_logits(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    regions: Sequence[RegionSet],
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = False,
) -> list[Tensor]:
    """Per-region grounding logits of every (expression, regions) pair: (R_i,) each."""
    out: list[Tensor] = []
    for s in _chunks(len(texts), batch_size, "ground", progress):
        chunk = regions[s : s + batch_size]
        y = model.ground(collate(texts[s : s + batch_size], chunk, tokenizer).to(device))
        out += [row[: len(r)] for row, r in zip(y.float().cpu(), chunk, strict=True)]
    return out


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: Sequence[str], batch_size=64, device="cpu") -> Tensor:
    """L2-normalised single-modality text embeddings (N, D), tokenised as the service does."""
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[s : s + batch_size]),
            padding="longest",
            truncation=True,
            max_length=MAX_TEXT_TOKENS,
            return_tensors="pt",
        )
        emb = model.embed_text(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        out.append(emb.float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def embed_images(model, tokenizer, regions: Sequence[RegionSet], batch_size=64, device="cpu"):
    """L2-normalised single-modality image embeddings (N, D)."""
    out = []
    for s in range(0, len(regions), batch_size):
        b = collate([""] * len(regions[s : s + batch_size]), regions[s : s + batch_size], tokenizer)
        b = b.to(device)
        out.append(
            model.embed_image(b.region_features, b.region_boxes, b.region_mask).float().cpu()
        )
    return torch.cat(out)


# ---- the four evaluations ----------------------------------------------------------------


def _images(source: PairSource, max_images: int | None, need: Callable[[int], list]) -> list[int]:
    found = [i for i in range(len(source)) if need(i)]
    return found[:max_images] if max_images else found


def eval_vqa(
    model,
    tokenizer,
    answers: Sequence[str],
    source: PairSource,
    batch_size=64,
    device="cpu",
    max_images: int | None = None,
    progress: bool = False,
) -> dict:
    """VQA accuracy of the top answer, overall and per family (see metrics.vqa_accuracy)."""
    texts, regions, gold, families = [], [], [], []
    for i in _images(source, max_images, source.questions):
        rs = source.region_set(i)
        for q in source.questions(i):
            texts.append(q["question"])
            regions.append(rs)
            gold.append(q["answer"])
            families.append(q["family"])
    logits = pair_scores(model, tokenizer, "answer", texts, regions, batch_size, device, progress)
    pred = [answers[int(row.argmax())] for row in logits]
    present = [f for f in FAMILIES if f in set(families)]  # in the usual order
    return vqa_accuracy(pred, gold, families, all_families=present)


def _gt_box(source: PairSource, i: int, index: int) -> Tensor:
    w, h = source.size(i)
    box = torch.tensor(source.objects(i)[index]["box"], dtype=torch.float64)
    return box / torch.tensor([w, h, w, h], dtype=torch.float64)


def eval_grounding(
    model,
    tokenizer,
    source: PairSource,
    batch_size=64,
    device="cpu",
    max_images: int | None = None,
    progress: bool = False,
) -> dict:
    """Share of expressions whose top region has IoU >= 0.5 with the referred object."""
    texts, regions, gold = [], [], []
    for i in _images(source, max_images, source.refexps):
        rs = source.region_set(i)
        for ref in source.refexps(i):
            texts.append(ref["expression"])
            regions.append(rs)
            gold.append(_gt_box(source, i, ref["index"]))
    logits = ground_logits(model, tokenizer, texts, regions, batch_size, device, progress)
    pred = [rs.boxes[int(row.argmax())] for row, rs in zip(logits, regions, strict=True)]
    reachable = [
        bool((paired_iou(rs.boxes, g.expand(len(rs), 4)) >= 0.5).any())
        for rs, g in zip(regions, gold, strict=True)
    ]
    return {
        "accuracy": grounding_accuracy(torch.stack(pred), torch.stack(gold)) if pred else None,
        "upper_bound": float(np.mean(reachable)) if reachable else None,
        "count": len(texts),
    }


@dataclass
class MatchPairs:
    """eval_match's draw: each image's complete caption, paired with a random other
    image's caption (checked false) and with a hard negative (one attribute, count or
    relation changed), where one exists; and one of its other, partial captions (true,
    "a blue circle left of a yellow circle"). texts[k] is read on regions[k]; pairs hold
    (positive index, negative index) into them."""

    texts: list[str] = field(default_factory=list)
    regions: list[RegionSet] = field(default_factory=list)
    positives: list[int] = field(default_factory=list)
    partial: list[int] = field(default_factory=list)  # true partial captions
    random: list[tuple[int, int]] = field(default_factory=list)
    hard: list[tuple[int, int]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # each hard pair's kind of change

    def add(self, text: str, regions: RegionSet) -> int:
        self.texts.append(text)
        self.regions.append(regions)
        return len(self.texts) - 1


def draw_match_pairs(
    source: PairSource, max_images: int | None = None, seed: int = 0
) -> MatchPairs:
    rng = np.random.default_rng(seed)
    partial_rng = np.random.default_rng([seed, 1])  # the negatives' draws stay as they were
    images = _images(source, max_images, source.captions)
    pool = [source.captions(i)[0] for i in images]  # other images' complete captions
    pairs = MatchPairs()
    for i in images:
        captions, objects, rs = source.captions(i), source.objects(i), source.region_set(i)
        rand = random_negative(objects, pool, rng)
        hard = sample_hard_negative(captions[0], objects, rng)
        p = pairs.add(captions[0], rs)
        pairs.positives.append(p)
        if rand is not None:
            pairs.random.append((p, pairs.add(rand.text, rs)))
        if hard is not None:
            pairs.hard.append((p, pairs.add(hard.text, rs)))
            pairs.kinds.append(hard.kind)
        if len(captions) > 1:
            other = captions[1 + int(partial_rng.integers(len(captions) - 1))]
            pairs.partial.append(pairs.add(other, rs))
    return pairs


def match_pair_parts(
    model,
    tokenizer,
    texts: Sequence[str],
    regions: Sequence[RegionSet],
    by_sentence: bool = False,
    **common,
) -> tuple[Tensor, Tensor]:
    """(C, 2): the alignment head logit and embeddings' cosine (`match_parts`) of each
    (text, regions) pair, or with `by_sentence` of each of the text's `match_claims` (the
    text itself first); and the index (C,) of the pair each row is of."""

    def parts(batch: Batch) -> Tensor:
        return torch.stack(match_parts(model, batch), -1)

    claims, owner = expand_claims(texts, by_sentence)
    claim_regions = [regions[i] for i in owner.tolist()]
    return pair_scores(model, tokenizer, parts, claims, claim_regions, **common), owner


def own_rows(owner: Tensor) -> Tensor:
    """Where each text's own row is among its claims' (`match_pair_parts`): (N,)."""
    return torch.nonzero(torch.diff(owner, prepend=owner.new_tensor([-1]))).squeeze(1)


def served_logits(
    calibration: MatchCalibration, parts: Tensor, owner: Tensor, claims: Tensor | None = None
) -> Tensor:
    """(N,) each text's match logit as served (`match_logits`), from `match_pair_parts`:
    the text's own calibrated logit, or by sentence the least of its sentences'; capped
    by its least claim margin (`least_claim_margins`, `MatchCalibration.with_claims`)
    when the calibration asks claims."""
    logits = calibration.logit(parts[:, 0], parts[:, 1])
    rows = own_rows(owner)
    out = least_per_text(logits, owner, len(rows)) if calibration.by_sentence else logits[rows]
    if calibration.claims is None:
        return out
    if claims is None:
        raise ValueError("this calibration checks claims: pass each text's least claim margin")
    return calibration.with_claims(out, claims)


def least_claim_margins(
    model, tokenizer, answers: Sequence[str], texts: Sequence[str], regions, **common
) -> Tensor:
    """(N,) each text's least claim margin on its regions (`claim_margins` of its
    `claim_questions`, asked of the VQA head); +inf for a text without claims."""
    questions, expected, owner = expand_claim_questions(texts, answers)
    if not questions:
        return torch.full((len(texts),), float("inf"))
    asked_on = [regions[i] for i in owner]
    logits = pair_scores(model, tokenizer, "answer", questions, asked_on, **common)
    margins = claim_margins(logits, torch.tensor(expected))
    return least_per_text(margins, torch.tensor(owner), len(texts))


def match_report(scores: Tensor, pairs: MatchPairs, threshold: float = 0.0) -> dict:
    """Pair accuracies (`metrics.match_accuracy`) of match logits, one per text."""
    score = scores.numpy()

    def judged(which: list[tuple[int, int]]) -> dict:
        if not which:
            return {"accuracy": None, "ranking": None, "binary": None, "count": 0}
        pos, neg = np.array(which).T
        return match_accuracy(score[pos], score[neg], threshold)

    out = {"random": judged(pairs.random), "hard": judged(pairs.hard)}
    by_kind = defaultdict(list)
    for pair, kind in zip(pairs.hard, pairs.kinds, strict=True):
        by_kind[kind].append(pair)
    kinds = {k: judged(v) for k, v in sorted(by_kind.items())}
    out["hard"]["by_kind"] = {k: m["accuracy"] for k, m in kinds.items()}
    out["hard"]["ranking_by_kind"] = {k: m["ranking"] for k, m in kinds.items()}
    for key, which in (
        ("positive_rate", pairs.positives),
        ("partial_positive_rate", pairs.partial),
    ):
        out[key] = float(np.mean(score[which] > threshold)) if which else None
    return out


def eval_match(
    model,
    tokenizer,
    source: PairSource,
    batch_size=64,
    device="cpu",
    max_images: int | None = None,
    seed: int = 0,
    progress: bool = False,
    calibration: MatchCalibration | None = None,
    answers: Sequence[str] | None = None,
) -> dict:
    """Complete caption vs a random false caption and vs a hard negative, per image, with
    the match logit as served (`match_logits`). Calibrated, "head" adds the pair
    accuracies of the alignment head's logit alone. A calibration that checks claims
    needs the model's `answers`."""
    pairs = draw_match_pairs(source, max_images, seed)
    common = dict(batch_size=batch_size, device=device, progress=progress)
    if calibration is None:
        head = pair_scores(model, tokenizer, "match", pairs.texts, pairs.regions, **common)
        return match_report(head, pairs)
    parts, owner = match_pair_parts(
        model, tokenizer, pairs.texts, pairs.regions, calibration.by_sentence, **common
    )
    claims = None
    if calibration.claims is not None:
        if answers is None:
            raise ValueError("a calibration that checks claims needs the answer vocabulary")
        claims = least_claim_margins(
            model, tokenizer, answers, pairs.texts, pairs.regions, **common
        )
    out = match_report(served_logits(calibration, parts, owner, claims), pairs)
    head = match_report(parts[own_rows(owner), 0], pairs)
    out["head"] = {k: head[k]["accuracy"] for k in ("random", "hard")}
    return out


def _inventory(objects: list[dict]) -> tuple:
    return tuple(sorted((o.get("size") or "", o["color"], o["shape"]) for o in objects))


def relevant_images(queries: Sequence[str], objects: Sequence[list[dict]]) -> list[set[int]]:
    """For each query caption q (of image q), the gallery images it is true of (q included).

    Only images with the same inventory of objects as image q can fit its complete
    caption, so only those are checked.
    """
    by_inventory = defaultdict(list)
    for j, objs in enumerate(objects):
        by_inventory[_inventory(objs)].append(j)
    out = []
    for q, text in enumerate(queries):
        same = by_inventory[_inventory(objects[q])]
        out.append({q} | {j for j in same if j != q and caption_holds(text, objects[j])})
    return out


def eval_retrieval(
    model,
    tokenizer,
    source: PairSource,
    gallery_size: int = 1000,
    rerank: int = 50,
    align_queries: int | None = None,
    batch_size=64,
    device="cpu",
    progress: bool = False,
) -> dict:
    """Text-to-image R@k on a gallery: embedding only, two-stage, and alignment head.

    `align_queries` limits how many queries (the first ones) the alignment head scores
    against every gallery image (Q x N pairs, the costly part); None = all, 0 = none.
    """
    images = _images(source, gallery_size, source.captions)
    queries = [source.captions(i)[0] for i in images]
    regions = [source.region_set(i) for i in images]
    relevant = relevant_images(queries, [source.objects(i) for i in images])
    n = len(images)
    text_emb = embed_texts(model, tokenizer, queries, batch_size, device)  # (Q, D)
    image_emb = embed_images(model, tokenizer, regions, batch_size, device)  # (N, D)
    cosine = text_emb @ image_emb.T  # (Q, N)
    common = dict(batch_size=batch_size, device=device, progress=progress)
    ranked = _rerank(model, tokenizer, queries, regions, cosine, min(rerank, n), **common)
    nq = n if align_queries is None else min(align_queries, n)
    out = {
        "gallery_size": n,
        "rerank": rerank,
        "align_queries": nq,
        "ambiguous_queries": sum(len(r) > 1 for r in relevant),
        "embed": recall_at_k(cosine, relevant, KS),
        "two_stage": recall_at_k(ranked, relevant, KS),
    }
    if nq:
        texts = [q for q in queries[:nq] for _ in range(n)]
        scores = pair_scores(model, tokenizer, "match", texts, regions * nq, **common)
        out["align"] = recall_at_k(scores.view(nq, n), relevant[:nq], KS)
        out["two_stage_same_queries"] = recall_at_k(ranked[:nq], relevant[:nq], KS)
    return out


def _rerank(model, tokenizer, queries, regions, cosine: Tensor, k: int, **common) -> list:
    """Per query, gallery indices: the cosine top k re-ordered by `two_stage_scores` (the
    embeddings' logit plus the alignment head's log-probability), then the rest in cosine
    order, as the gallery service searches."""
    order = torch.argsort(cosine, dim=1, descending=True, stable=True)  # (Q, N)
    if k == 0:
        return order.tolist()
    texts = [q for q in queries for _ in range(k)]
    pairs = [regions[j] for row in order[:, :k].tolist() for j in row]
    logits = pair_scores(model, tokenizer, "match", texts, pairs, **common).view(len(queries), k)
    head = two_stage_scores(torch.gather(cosine, 1, order[:, :k]), logits)  # (Q, k)
    first = torch.gather(order[:, :k], 1, torch.argsort(head, dim=1, descending=True, stable=True))
    return torch.cat([first, order[:, k:]], dim=1).tolist()


# ---- run_eval ------------------------------------------------------------------------------


def load_model(store: ModelStore, manifest: Manifest, device: str = "cpu"):
    """(model in eval mode on device, tokenizer) of a store entry, as the service loads it."""
    model = build_backbone(manifest.kind, manifest.config)
    model.load_state_dict(store.load_tensors(manifest))
    tokenizer = load_tokenizer(str(manifest.path)) if manifest.tokenizer else load_tokenizer()
    return model.to(device).eval(), tokenizer


def check_detector(manifest: Manifest, source: PairSource) -> None:
    made_by = source.features.meta.get("detector")
    if manifest.detector and made_by and made_by != manifest.detector:
        raise ValueError(
            f"{source.features.path} holds regions of {made_by}, but {manifest.ref} was "
            f"trained on {manifest.detector}'s: evaluate on features of its own detector"
        )


COUNT_KEYS = ("count", "by_family_count")  # how many items were measured: not metrics
NAMED_BY_KIND = ("by_family", "by_kind", "ranking_by_kind")  # where "count" names a kind


def flat_metrics(results: dict, prefix: str, _parent: str = "") -> dict[str, float]:
    """Nested results -> {"<prefix>/<task>/.../<name>": number}, item counts left out
    (the "count" question family's and hard-negative kind's figures stay)."""
    out = {}
    for key, value in results.items():
        if key in COUNT_KEYS and _parent not in NAMED_BY_KIND:
            continue
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(flat_metrics(value, name, key))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def run_eval(
    model_ref: str,
    store_root: str | Path,
    task: str,
    features_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    gallery_size: int = 1000,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    rerank: int = 50,
    align_queries: int | None = 100,
    easyvqa: bool | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate `model_ref` ("name" or "name@version") on `split`; returns the metrics.

    task: "vqa" | "retrieval" | "grounding" | "match" | "all" (the four). Regions come
    from <features_dir>/<split>.safetensors (made by the model's own detector, checked),
    texts and boxes from <data_dir>/<split>.jsonl. easyvqa: also score easy-VQA's test
    split (<features_dir>/easyvqa_test.safetensors); None = when task includes vqa and
    the model was fine-tuned with easy-VQA. align_queries: how many queries the alignment
    head scores against the whole gallery (None = all, 0 = skip). That is Q x N pairs: on
    2 CPU cores the demo ViLBERT scores about 60 pairs/s and LXMERT about 160 with
    40-token captions, so all 1,000 x 1,000 would take hours; the two-stage search costs
    N x `rerank` pairs. Writes
    <out_dir>/metrics.json (merged with an earlier one for the same model and split),
    vqa_by_family.png and training_curves.png (from the entry's history.json), and
    merges the flat metrics into the manifest.
    """
    tasks = EVAL_TASKS if task == "all" else (task,)
    if any(t not in EVAL_TASKS for t in tasks):
        raise ValueError(f"task must be one of {EVAL_TASKS} or 'all', not {task!r}")
    store = ModelStore(store_root)
    manifest = store.resolve(model_ref)
    model, tokenizer = load_model(store, manifest, device)
    source = PairSource.load(data_dir, features_dir, split)
    check_detector(manifest, source)
    common = dict(batch_size=batch_size, device=device, progress=progress)
    results: dict = {}
    for t in tasks:
        if t == "vqa":
            results["vqa"] = eval_vqa(model, tokenizer, _answers(manifest), source, **common)
        elif t == "retrieval":
            results["retrieval"] = eval_retrieval(
                model, tokenizer, source, gallery_size, rerank, align_queries, **common
            )
        elif t == "grounding":
            results["grounding"] = eval_grounding(model, tokenizer, source, **common)
        else:
            calibration = MatchCalibration.from_dict(manifest.match_calibration)
            results["match"] = eval_match(
                model,
                tokenizer,
                source,
                seed=seed,
                calibration=calibration,
                answers=_answers(manifest),
                **common,
            )
    if easyvqa or (easyvqa is None and "vqa" in tasks and manifest.data.get("include_easyvqa")):
        results["easyvqa"] = eval_vqa(
            model, tokenizer, _answers(manifest), easyvqa_source(features_dir, "test"), **common
        )
    out = Path(out_dir) if out_dir is not None else Path("docs/experiments") / manifest.name
    write_report(store, manifest, results, split, out)
    return results


def _answers(manifest: Manifest) -> list[str]:
    if not manifest.answers:
        raise ValueError(f"{manifest.ref} has no answer vocabulary: it cannot answer questions")
    return list(manifest.answers)


def easyvqa_source(features_dir: str | Path, split: str) -> PairSource:
    """easy-VQA's records (from the installed package) joined with their region features
    at <features_dir>/easyvqa_<split>.safetensors."""
    from service.data.easyvqa import load_split
    from service.data.features import FeatureFile

    path = feature_path(features_dir, f"easyvqa_{split}")
    if not path.is_file():
        raise FileNotFoundError(
            f"no easy-VQA region features at {path}: compute them for easy-VQA's {split} split "
            "with the model's detector first"
        )
    return PairSource(load_split(split), FeatureFile(path))


def write_report(
    store: ModelStore, manifest: Manifest, results: dict, split: str, out_dir: Path
) -> dict:
    """metrics.json + plots into out_dir, flat metrics into the manifest; returns the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    report = {"model": manifest.ref, "detector": manifest.detector, "splits": {}}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("model") == manifest.ref:
            report = old
    report["splits"][split] = {**report["splits"].get(split, {}), **results}
    path.write_text(json.dumps(report, indent=2) + "\n")
    if "vqa" in results:
        plot_family_accuracy(
            results["vqa"]["by_family"],
            out_dir / "vqa_by_family.png",
            title=f"{manifest.ref}: VQA accuracy by family ({split})",
        )
    if "history.json" in manifest.files:
        history = json.loads(store.file_path(manifest, "history.json").read_text())
        plot_training_curves(history, out_dir / "training_curves.png", title=manifest.ref)
    store.update_manifest(manifest, flat_metrics(results, split))
    return report
