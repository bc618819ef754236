"""Fine-tuning: the objectives on hand-made cases, tiny runs that learn, and the store entry."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.data.features import write_feature_file
from service.data.language import ANSWERS
from service.data.records import load_records, write_records
from service.data.shapes import (
    COLORS,
    SHAPES,
    SIZE_RANGES,
    SIZES,
    ShapeObject,
    scene_from_objects,
    scene_record,
)
from service.data.tokenizer import load_tokenizer
from service.models.backbone import WORD_CHECK_PRIOR, build_backbone
from service.store import ModelStore
from service.training.evaluate import eval_vqa, load_model, run_eval
from service.training.examples import PairSource
from service.training.finetune import (
    AlignObjective,
    changed_tokens,
    grounding_loss,
    info_nce,
    make_evaluate,
    pair_rank_loss,
    run_finetune,
    vqa_loss,
    word_check_loss,
)
from service.training.mix import Mix
from service.training.negatives import caption_holds, hard_negatives
from tests.training.pretrain_support import (
    DETECTOR,
    synthetic_regions,
    tiny_overrides,
    write_tiny_split,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _single_object_split(root: Path, split: str, n: int, seed: int) -> None:
    """Scenes of one object asked only its colour and shape: answers that need the image."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        size = SIZES[rng.integers(2)]
        lo, hi = SIZE_RANGES[size]
        side = int(rng.integers(int(lo * 64) + 1, int(hi * 64)))
        x, y = (int(v) for v in rng.integers(2, 62 - side, 2))
        obj = ShapeObject(
            SHAPES[rng.integers(3)], list(COLORS)[rng.integers(8)], size, (x, y, x + side, y + side)
        )
        r = scene_record(scene_from_objects([obj], 64), rng, "x.png", f"{split}_{i}")
        r["questions"] = [q for q in r["questions"] if q["family"] in ("color", "shape")]
        records.append(r)
    write_records(root / "data" / f"{split}.jsonl", records)
    g = np.random.default_rng(seed)
    write_feature_file(
        root / "features" / f"{split}.safetensors",
        [r["id"] for r in records],
        [synthetic_regions(r, g) for r in records],
        {"detector": DETECTOR},
    )


def _prior_accuracy(train: list[dict], test: list[dict]) -> float:
    """Accuracy of answering each family's most frequent training answer."""
    by_family: dict[str, Counter] = {}
    for r in train:
        for q in r["questions"]:
            by_family.setdefault(q["family"], Counter())[q["answer"]] += 1
    prior = {f: c.most_common(1)[0][0] for f, c in by_family.items()}
    qs = [q for r in test for q in r["questions"]]
    return sum(prior[q["family"]] == q["answer"] for q in qs) / len(qs)


def _train_losses(manifest, key: str) -> list[float]:
    history = json.loads((manifest.path / "history.json").read_text())
    return [h[key] for h in history if h["kind"] == "train" and key in h]


# ---- objectives on hand-made numbers -------------------------------------------------------


def test_vqa_loss_is_mean_bce_times_answers():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, -3.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.3, 1.0]])
    per = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert vqa_loss(logits, targets).item() == pytest.approx(per.sum().item() / 2)


def test_info_nce_leaves_identical_captions_out_of_the_negatives():
    # texts 0 and 1 are the same caption and images 0 and 1 look alike: without the mask
    # each would be pushed away from the other's image
    t = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    v = t.clone()
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    masked = info_nce(t, v, same, temperature=0.05)
    plain = info_nce(t, v, torch.eye(3, dtype=torch.bool), temperature=0.05)
    assert masked.item() < 1e-6 < plain.item()
    assert plain.item() == pytest.approx(2 / 3 * np.log(2), rel=1e-4)


def test_grounding_loss_counts_every_acceptable_region():
    logits = torch.tensor([[0.0, 0.0, 0.0, -1e30]])  # 3 real regions, 1 padded
    one = torch.tensor([[True, False, False, False]])
    two = torch.tensor([[True, True, False, False]])
    assert grounding_loss(logits, one).item() == pytest.approx(np.log(3))
    assert grounding_loss(logits, two).item() == pytest.approx(np.log(3 / 2))


def test_align_objective_pairs_true_captions_with_false_ones(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=24)
    source = PairSource.load(data, features, "train")
    rng = np.random.default_rng(0)
    others = {c for i in range(len(source)) for c in source.captions(i)}
    for hard_frac in (0.0, 1.0):
        objective = AlignObjective(source, load_tokenizer(), 0.5, hard_frac)
        for i in range(len(source)):
            objects, own = source.objects(i), source.captions(i)
            positive = objective.positive(i, rng)
            assert caption_holds(positive, objects)
            negative = objective.negative(i, positive, rng)
            assert not caption_holds(negative.text, objects)
            twins = hard_negatives(positive, objects)
            if hard_frac == 1.0 and twins:  # a one-change variant of the true caption
                assert negative in twins
            else:  # another image's caption
                assert negative.kind == "random"
                assert negative.text in others and negative.text not in own


def test_sentence_share_draws_single_sentences_of_the_complete_caption(tmp_path):
    """With sentence_frac 1, an image whose complete caption has a listing and a relation
    sentence gives one of the two alone, true of the image, and its twin (the relation
    sentence's: the relation turned) false; other images give their complete caption."""
    data, features = write_tiny_split(tmp_path, "train", n=24)
    source = PairSource.load(data, features, "train")
    rng = np.random.default_rng(0)
    objective = AlignObjective(source, load_tokenizer(), 1.0, 1.0, sentence_frac=1.0)
    drawn, relation_twins = set(), 0
    for i in range(len(source)):
        complete, objects = source.captions(i)[0], source.objects(i)
        listing, _, relation = complete.partition(". ")
        for _ in range(6):
            positive = objective.positive(i, rng)
            assert positive in ((listing, relation) if relation else (complete,))
            assert caption_holds(positive, objects)
            drawn.add(positive)
            negative = objective.negative(i, positive, rng)
            assert not caption_holds(negative.text, objects)
            if positive == relation and negative.kind == "relation":
                assert negative.text.split(" is ")[0] == relation.split(" is ")[0]
                relation_twins += 1
    assert relation_twins > 0 and len(drawn) > len(source)


def test_rank_pairs_set_a_true_caption_against_its_own_twin(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=24)
    source = PairSource.load(data, features, "train")
    tok = load_tokenizer()
    objective = AlignObjective(source, tok, 0.5, 0.5, rank_weight=1.0)
    prepared = objective.prepare(np.random.default_rng(0), 24, torch.device("cpu"))
    pairs = prepared.rank_pairs.tolist()
    assert 0 < len(pairs) < 24  # about half the negatives are random ones
    ids = prepared.pairs.input_ids
    complete = {
        tok.decode(tok(source.captions(i)[0])["input_ids"], skip_special_tokens=True)
        for i in range(len(source))
    }
    partial = 0
    for true, false in pairs:
        assert prepared.labels[true] == 1 and prepared.labels[false] == 0
        t, f = (tok.decode(ids[r], skip_special_tokens=True) for r in (true, false))
        changed = [a != b for a, b in zip(t.split(), f.split(), strict=False)]
        assert 1 <= sum(changed) <= 2 or len(t.split()) != len(f.split()), (t, f)
        partial += t not in complete
    assert partial > 0  # partial captions get twins of their own too


def test_changed_tokens_are_the_twins_edits():
    assert changed_tokens([1, 5, 6, 7, 2], [1, 5, 9, 7, 2]) == [2]  # one word swapped
    assert changed_tokens([1, 5, 6, 2], [1, 8, 9, 6, 2]) == [1, 2]  # "a" -> "two small"
    assert changed_tokens([1, 5, 6, 7, 2], [1, 5, 7, 2]) == [2]  # a word dropped: the next


def test_word_targets_mark_a_twins_changed_words_and_leave_random_captions_out(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=24)
    source = PairSource.load(data, features, "train")
    tok = load_tokenizer()
    objective = AlignObjective(source, tok, 0.5, 0.5, word_weight=1.0)
    prepared = objective.prepare(np.random.default_rng(0), 24, torch.device("cpu"))
    ids, mask = prepared.pairs.input_ids, prepared.pairs.attention_mask.bool()
    targets, known = prepared.word_targets, prepared.word_known
    twins = {f: t for t, f in prepared.rank_pairs.tolist()}
    assert 0 < len(twins) < int((prepared.labels == 0).sum())  # some negatives are random
    for row, label in enumerate(prepared.labels.tolist()):
        if label == 1:  # every token of a true caption is known true
            assert torch.equal(known[row], mask[row]) and targets[row].sum() == 0
        elif row not in twins:  # a random caption: which word is false is unknown
            assert not known[row].any()
        else:
            assert torch.equal(known[row], mask[row])
            changed = set(targets[row].nonzero().flatten().tolist())
            twin, true = ids[row][mask[row]].tolist(), ids[twins[row]][mask[twins[row]]].tolist()
            assert changed and len(changed) <= len(twin) // 2  # some words, not the caption
            kept = iter(true)  # the twin's other tokens are the true caption's, in order
            assert all(t in kept for i, t in enumerate(twin) if i not in changed)


def test_word_check_loss_is_token_bce_plus_the_captions_most_suspect_word():
    words = torch.tensor([[-2.0, 1.0, 5.0], [0.0, 3.0, -1.0], [-1.0, -3.0, 0.0]])
    targets = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    known = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    labels = torch.tensor([1.0, 0.0, 0.0])  # a true caption, its twin, a random caption
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])  # 5.0 is padding
    bce = F.binary_cross_entropy_with_logits
    token = bce(torch.tensor([-2.0, 1.0, 0.0, 3.0, -1.0]), torch.tensor([0.0, 0, 0, 1, 0]))
    caption = bce(torch.tensor([1.0, 3.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert torch.isclose(word_check_loss(words, targets, known, labels, mask), token + caption)


def test_pair_rank_loss_is_the_log_loss_of_the_gap():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.5])
    pairs = torch.tensor([[0, 1], [2, 3]])
    expected = (F.softplus(torch.tensor(-3.0)) + F.softplus(torch.tensor(0.0))) / 2
    assert torch.isclose(pair_rank_loss(logits, pairs), expected)


# ---- tiny runs ----------------------------------------------------------------------------


def test_vqa_finetune_learns_to_read_the_image(tmp_path):
    for split, n, seed in (("train", 64, 0), ("val", 16, 1), ("test", 48, 2)):
        _single_object_split(tmp_path, split, n, seed)
    data, features = tmp_path / "data", tmp_path / "features"
    m = run_finetune(
        "vqa",
        "none",
        backbone="lxmert",
        features_dir=features,
        data_dir=data,
        store_root=tmp_path / "store",
        out_name="tiny-vqa",
        steps=150,
        batch_size=16,
        lr=3e-3,
        seed=0,
        config_overrides=tiny_overrides("lxmert"),
        command="vqa train finetune --task vqa",
        progress=False,
    )
    losses = _train_losses(m, "vqa")
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    # the manifest describes the entry
    assert m.tasks == ["vqa"] and m.answers == list(ANSWERS) and m.detector == DETECTOR
    assert m.data["seed"] == 0 and m.data["label_fraction"] == 1.0 and m.data["init"] == "none"
    assert m.command == "vqa train finetune --task vqa"
    assert m.match_calibration is None  # fitted only when matching is trained
    assert 0.0 <= m.metrics["val/vqa_accuracy"] <= 1.0
    # held out: better than answering each family's most common training answer
    results = run_eval(
        m.ref, tmp_path / "store", "vqa", features, data, out_dir=tmp_path / "out", progress=False
    )
    prior = _prior_accuracy(load_records(data, "train"), load_records(data, "test"))
    assert results["vqa"]["overall"] > prior + 0.1, (results["vqa"], prior)


def test_retrieval_finetune_learns_dual_embeddings_that_generalise(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=48)
    write_tiny_split(tmp_path, "test", n=24)
    m = run_finetune(
        "retrieval",
        "none",
        backbone="lxmert",
        features_dir=features,
        data_dir=data,
        store_root=tmp_path / "store",
        steps=60,
        batch_size=16,
        lr=1e-3,
        seed=0,
        config_overrides=tiny_overrides("lxmert"),
        progress=False,
    )
    assert m.tasks == ["retrieval", "match"]
    nce = _train_losses(m, "nce")
    assert np.mean(nce[-5:]) < 0.2 * np.mean(nce[:5])
    results = run_eval(
        m.ref,
        tmp_path / "store",
        "retrieval",
        features,
        data,
        out_dir=tmp_path / "out",
        progress=False,
    )
    # held-out gallery of 24 images: chance R@1 is about 1/24
    assert results["retrieval"]["embed"]["R@1"] > 0.3, results["retrieval"]


def test_grounding_finetune_points_at_the_referred_object(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=48)
    write_tiny_split(tmp_path, "test", n=24)
    m = run_finetune(
        "grounding",
        "none",
        backbone="lxmert",
        features_dir=features,
        data_dir=data,
        store_root=tmp_path / "store",
        steps=100,
        batch_size=16,
        lr=3e-3,
        seed=0,
        config_overrides=tiny_overrides("lxmert"),
        progress=False,
    )
    assert m.tasks == ["ground"]
    losses = _train_losses(m, "ground")
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    results = run_eval(
        m.ref,
        tmp_path / "store",
        "grounding",
        features,
        data,
        out_dir=tmp_path / "out",
        progress=False,
    )
    # baselines: always the first region (the first object's), or a region at random
    refs = [e for r in load_records(data, "test") for e in r["refexps"]]
    first = np.mean([e["index"] == 0 for e in refs])
    uniform = np.mean(
        [1 / (len(r["objects"]) + 2) for r in load_records(data, "test") for _ in r["refexps"]]
    )
    accuracy = results["grounding"]["accuracy"]
    assert accuracy > max(first, uniform) + 0.08, (accuracy, first, uniform)


def test_all_tasks_round_robin_lowers_every_loss(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=32)
    write_tiny_split(tmp_path, "val", n=12)
    m = run_finetune(
        "all",
        "none",
        backbone="vilbert",
        features_dir=features,
        data_dir=data,
        store_root=tmp_path / "store",
        steps=90,
        batch_size=12,
        lr=1e-3,
        seed=0,
        config_overrides=tiny_overrides("vilbert"),
        progress=False,
    )
    assert m.name == "vilbert-all"
    assert m.tasks == ["vqa", "match", "ground", "retrieval"]
    for part in ("vqa", "match", "nce", "ground"):
        assert len(_train_losses(m, part)) == 30, part  # one objective per step, in turn
    # the alignment BCE barely moves in 30 steps from scratch (it needs pretraining or
    # hundreds of steps); every objective's own total falls
    for part in ("vqa", "ground"):
        losses = _train_losses(m, part)
        assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), (part, losses)
    align = np.add(_train_losses(m, "match"), _train_losses(m, "nce"))
    assert np.mean(align[-5:]) < 0.5 * np.mean(align[:5])
    # validation measured every objective; the entry keeps the best evaluation's numbers
    for name in (
        "vqa_accuracy",
        "match_random",
        "match_hard",
        "retrieval_r1",
        "grounding_accuracy",
    ):
        assert 0.0 <= m.metrics[f"val/{name}"] <= 1.0, name
    evals = [h for h in json.loads((m.path / "history.json").read_text()) if h["kind"] == "eval"]
    assert len(evals) == 5 and m.metrics["val/score"] == max(e["score"] for e in evals)
    # the match calibration was fitted on every validation image, kept only if it helps
    if m.match_calibration is not None:
        fitted = m.match_calibration["fitted_on"]
        assert fitted["split"] == "val" and fitted["images"] == 12
        calibrated, head = fitted["accuracy"]["calibrated"], fitted["accuracy"]["head"]
        assert sum(calibrated.values()) > sum(head.values())
    # the manifest alone rebuilds the trained model
    store = ModelStore(tmp_path / "store")
    rebuilt = build_backbone(m.kind, m.config)
    rebuilt.load_state_dict(store.load_tensors(m))
    assert rebuilt.config.num_answers == len(ANSWERS)


def test_word_check_loss_falls_and_the_entry_keeps_the_word_check(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=32)
    m = run_finetune(
        "match",
        "none",
        backbone="lxmert",
        features_dir=features,
        data_dir=data,
        store_root=tmp_path / "store",
        steps=200,
        batch_size=12,
        lr=3e-3,
        seed=0,
        config_overrides={**tiny_overrides("lxmert"), "word_check": True},
        mix={"hard_share": 1.0, "word_check": 1.0},
        progress=False,
    )
    words = _train_losses(m, "words")
    assert len(words) == 200 and np.mean(words[-20:]) < 0.85 * np.mean(words[:20]), words
    assert m.config["word_check"] and m.data["mix"]["word_check"] == 1.0
    rebuilt = build_backbone(m.kind, m.config)  # the manifest alone rebuilds it, head and all
    rebuilt.load_state_dict(ModelStore(tmp_path / "store").load_tensors(m))
    assert rebuilt.extra_heads.word_check is not None


# ---- options and checks -------------------------------------------------------------------


def _random_entry(store_root: Path, answers, detector: str) -> str:
    torch.manual_seed(1)
    cfg = tiny_overrides("vilbert")
    cfg["num_answers"] = len(answers)
    model = build_backbone("vilbert", cfg)
    m = ModelStore(store_root).write(
        "pre",
        "vilbert",
        {"model.safetensors": model.state_dict()},
        config=cfg,
        answers=list(answers),
        detector=detector,
        tasks=["pretrain"],
    )
    return m.ref


def test_init_from_a_store_entry_keeps_its_weights_and_resizes_the_answer_head(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=8)
    store = ModelStore(tmp_path / "store")
    ref = _random_entry(store.root, ["yes", "no"], DETECTOR)
    m = run_finetune(
        "vqa",
        ref,
        features_dir=features,
        data_dir=data,
        store_root=store.root,
        out_name="from-pre",
        steps=0,
        batch_size=4,
        lr=1e-3,
        progress=False,
    )
    before, after = store.load_tensors(store.resolve(ref)), store.load_tensors(m)
    assert m.kind == "vilbert" and m.data["init"] == ref and m.detector == DETECTOR
    assert m.config["num_answers"] == len(ANSWERS)
    for key, value in before.items():
        if key.startswith("answer_head.mlp.3"):
            assert after[key].shape[0] == len(ANSWERS)
        else:
            assert torch.equal(after[key], value.to(after[key].dtype)), key


def test_init_trained_on_another_detector_is_refused(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=8)
    ref = _random_entry(tmp_path / "store", ANSWERS, "other-detector@3")
    with pytest.raises(ValueError, match="other-detector@3"):
        run_finetune(
            "vqa",
            ref,
            features_dir=features,
            data_dir=data,
            store_root=tmp_path / "store",
            steps=0,
            batch_size=4,
            lr=1e-3,
            progress=False,
        )


def test_label_fraction_keeps_that_share_of_vqa_images(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=40)
    common = dict(
        backbone="lxmert",
        features_dir=features,
        data_dir=data,
        store_root=tmp_path / "s",
        steps=1,
        batch_size=4,
        lr=1e-3,
        config_overrides=tiny_overrides("lxmert"),
        progress=False,
    )
    tenth = run_finetune("vqa", "none", label_fraction=0.1, **common)
    assert tenth.data["vqa_images"] == [4] and tenth.data["images"] == 40
    full = run_finetune("vqa", "none", **common)
    assert full.data["vqa_images"] == [40]
    with pytest.raises(ValueError):
        run_finetune("vqa", "none", label_fraction=0.0, **common)


def test_unknown_task_and_missing_backbone_are_refused(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=4)
    common = dict(
        features_dir=features, data_dir=data, store_root=tmp_path / "s", steps=0, progress=False
    )
    with pytest.raises(ValueError, match="task"):
        run_finetune("captioning", "none", backbone="vilbert", **common)
    with pytest.raises(ValueError, match="backbone"):
        run_finetune("vqa", "none", **common)


@pytest.mark.parametrize("kind", ["lxmert", "vilbert"])
def test_word_check_is_added_to_an_entry_without_one_and_refused_without_the_config(tmp_path, kind):
    data, features = write_tiny_split(tmp_path, "train", n=8)
    store = ModelStore(tmp_path / "store")
    torch.manual_seed(1)
    cfg = tiny_overrides(kind)
    ref = store.write(
        "pre",
        kind,
        {"model.safetensors": build_backbone(kind, cfg).state_dict()},
        config=cfg,
        answers=list(ANSWERS),
        detector=DETECTOR,
        tasks=["pretrain"],
    ).ref
    common = dict(
        features_dir=features, data_dir=data, store_root=store.root, batch_size=4, lr=1e-3
    )
    with pytest.raises(ValueError, match="word_check"):
        run_finetune("match", ref, steps=0, mix={"word_check": 1.0}, progress=False, **common)
    m = run_finetune(
        "match",
        ref,
        steps=0,
        config_overrides={"word_check": True},
        progress=False,
        **common,
    )
    before, after = store.load_tensors(store.resolve(ref)), store.load_tensors(m)
    head = "token_head" if kind == "vilbert" else "extra_heads.word_check"
    assert set(after) - set(before) <= {f"{head}.weight", f"{head}.bias"}
    for key, value in before.items():  # every other weight as the entry had it
        if not key.startswith(head):
            assert torch.equal(after[key], value.to(after[key].dtype)), key
    assert torch.all(after[f"{head}.bias"] == WORD_CHECK_PRIOR)  # fresh: no word false


def test_validation_scores_vqa_on_the_families_the_mix_draws(tmp_path):
    for split, n, seed in (("train", 16, 0), ("val", 12, 1)):
        _single_object_split(tmp_path, split, n, seed)
    data, features = tmp_path / "data", tmp_path / "features"
    colour_only = {"vqa_families": {"shape": 0}}
    m = run_finetune(
        "vqa",
        "none",
        backbone="lxmert",
        features_dir=features,
        data_dir=data,
        store_root=tmp_path / "store",
        out_name="tiny-colour",
        steps=4,
        batch_size=8,
        lr=3e-3,
        config_overrides=tiny_overrides("lxmert"),
        progress=False,
        mix=colour_only,
    )
    history = json.loads((m.path / "history.json").read_text())
    evals = [h for h in history if h["kind"] == "eval"]
    assert evals and all("vqa_overall" in h for h in evals)
    store = ModelStore(tmp_path / "store")
    model, tokenizer = load_model(store, m)
    source = PairSource.load(data, features, "val")
    vqa = eval_vqa(model, tokenizer, ANSWERS, source)
    drawn = make_evaluate("vqa", source, ANSWERS, tokenizer, 100, "cpu", Mix.parse(colour_only))
    metrics = drawn(model)
    assert metrics["vqa_accuracy"] == pytest.approx(vqa["by_family"]["color"])
    assert metrics["score"] == metrics["vqa_accuracy"] and metrics["vqa_overall"] == vqa["overall"]
    uniform = make_evaluate("vqa", source, ANSWERS, tokenizer, 100, "cpu", Mix())(model)
    assert uniform == {"vqa_accuracy": vqa["overall"], "score": vqa["overall"]}
