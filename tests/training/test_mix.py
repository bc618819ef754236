"""Fine-tuning mixes: objective cycles, weighted VQA draws and hard-negative kinds."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from service.data.language import ANSWERS
from service.data.tokenizer import load_tokenizer
from service.training.examples import PairSource
from service.training.finetune import ALIGN_MIX, VqaObjective, make_objectives, run_finetune
from service.training.mix import Mix, item_weights, weighted_choice
from service.training.negatives import OPPOSITE, Negative, pick_hard_negative
from tests.training.pretrain_support import tiny_overrides, write_tiny_split

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cycle_interleaves_objectives_by_weight():
    mix = Mix(objectives={"vqa": 2, "grounding": 1, "match": 2})
    assert mix.cycle(["vqa", "match", "grounding"]) == ["vqa", "match", "grounding", "vqa", "match"]
    assert Mix().cycle(["vqa", "match"]) == ["vqa", "match"]
    assert Mix(objectives={"match": 0}).cycle(["vqa", "match"]) == ["vqa"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"objectives": {"vqa": 1.5}}, "whole number"),
        ({"vqa_families": {"count": -1}}, "weight >= 0"),
        ({"hard_kind": {}}, "unknown mix fields"),
        ({"align_rank": -0.5}, "align_rank must be a weight >= 0"),
        ({"word_check": "yes"}, "word_check must be a weight >= 0"),
        ({"hard_share": 1.5}, "hard_share must be a fraction"),
        ({"complete_share": "most"}, "complete_share must be a fraction"),
    ],
)
def test_bad_mixes_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        Mix.parse(spec)


def test_cycle_refuses_unknown_or_all_zero_objectives():
    with pytest.raises(ValueError, match="not trained here"):
        Mix(objectives={"caption": 1}).cycle(["vqa"])
    with pytest.raises(ValueError, match="weight 0"):
        Mix(objectives={"vqa": 0}).cycle(["vqa"])


def test_parse_reads_dicts_json_text_and_files(tmp_path):
    spec = {"vqa_families": {"count": 3.0}, "hard_kinds": {"relation": 2}}
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(spec))
    for given in (spec, json.dumps(spec), str(path)):
        assert Mix.parse(given).to_dict() == {**Mix().to_dict(), **spec}
    assert Mix.parse(None) == Mix()


def test_source_weights_set_the_share_of_draws_whatever_the_sizes():
    # 900 shapes questions, 100 easy-VQA ones: 4:1 by weight instead of 9:1 by size
    labels = (
        [("shapes", "count", "2")] * 300
        + [("shapes", "color", "red")] * 600
        + [("easy-vqa", "color", "red")] * 100
    )
    w = item_weights(labels, {"shapes": 4, "easy-vqa": 1}, {"count": 2})
    picks = weighted_choice(w, np.random.default_rng(0), 20_000, len(labels))
    drawn = Counter(labels[int(j)][:2] for j in picks)
    n = sum(drawn.values())
    assert abs((drawn[("easy-vqa", "color")] / n) - 0.2) < 0.01
    # within shapes, count weighs 2 per question: 600 : 600 of the shapes share
    assert abs(drawn[("shapes", "count")] / n - 0.4) < 0.01
    # no source weights: sources weigh as many as their questions, families still scale
    w = item_weights(labels, {}, {"count": 0})
    assert w[:300].sum() == 0 and np.allclose(w[300:], 1.0)
    assert item_weights(labels, {}, {}) is None


def test_answer_weights_scale_the_questions_with_that_gold_answer():
    labels = [("shapes", "count", "1")] * 90 + [("shapes", "count", "5")] * 10
    w = item_weights(labels, {}, {"count": 2}, {"5": 9})
    assert np.allclose(w[:90], 2.0) and np.allclose(w[90:], 18.0)  # family x answer
    picks = weighted_choice(w, np.random.default_rng(0), 20_000, len(labels))
    assert abs(np.mean(picks >= 90) - 0.5) < 0.01  # 10 questions x 9 = 90 x 1: half the draws


def test_hard_kind_weights_shift_the_draw_and_zero_leaves_a_kind_out():
    groups = {
        k: [Negative(f"{k} {v}", k) for v in range(n)]
        for k, n in [("color", 5), ("relation", 1), ("size", 2)]
    }
    rng = np.random.default_rng(0)
    drawn = Counter(pick_hard_negative(groups, rng, {"relation": 3}).kind for _ in range(5000))
    assert abs(drawn["relation"] / 5000 - 3 / 5) < 0.02
    drawn = Counter(pick_hard_negative(groups, rng, {"color": 0}).kind for _ in range(500))
    assert set(drawn) == {"relation", "size"}
    assert pick_hard_negative({"relation": groups["relation"]}, rng, {"relation": 0}) is None


def test_shares_override_the_alignment_defaults_and_none_keeps_them(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=16)
    source = PairSource.load(data, features, "train")
    tok = load_tokenizer()
    match = make_objectives("match", source, tok, mix=Mix(hard_share=0.9, complete_share=0.8))
    assert (match["match"].complete_frac, match["match"].hard_frac) == (0.8, 0.9)
    plain = make_objectives("retrieval", source, tok, mix=Mix(complete_share=0.3))
    assert plain["retrieval"].complete_frac == 0.3
    assert plain["retrieval"].hard_frac == ALIGN_MIX["retrieval"][1]


def test_vqa_objective_weights_follow_each_questions_family_and_answer(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=16)
    source = PairSource.load(data, features, "train")
    mix = Mix(vqa_families={"count": 0, "relation": 5}, vqa_answers={"yes": 3})
    objective = VqaObjective([source], ANSWERS, load_tokenizer(), mix=mix)
    questions = [source.questions(i)[k] for _, i, k in objective.items]
    families = [q["family"] for q in questions]
    assert "count" in families and "relation" in families
    for q, w in zip(questions, objective.weights, strict=True):
        expected = {"count": 0.0, "relation": 5.0}.get(q["family"], 1.0)
        assert w == expected * (3.0 if q["answer"] == "yes" else 1.0)


def test_turned_relation_questions_join_their_twins_in_the_batch(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=16)
    source = PairSource.load(data, features, "train")
    tok = load_tokenizer()
    only_relations = {f: 0 for f in ("exist", "count", "color", "shape", "size")}
    plain = VqaObjective([source], ANSWERS, tok, mix=Mix(vqa_families=only_relations))
    mix = Mix(vqa_families=only_relations, vqa_turned=1.0)
    turned = VqaObjective([source], ANSWERS, tok, mix=mix)
    batch = plain.prepare(np.random.default_rng(0), 32, torch.device("cpu"))
    assert batch.targets.shape[0] == 32
    batch = turned.prepare(np.random.default_rng(0), 32, torch.device("cpu"))
    texts = tok.batch_decode(batch.batch.input_ids, skip_special_tokens=True)
    answers = [ANSWERS[int(t.argmax())] for t in batch.targets]
    twins, k = [], 0  # a drawn question is followed by its twin, if any
    while k < len(texts) - 1:
        if texts[k + 1] == _turned_words(texts[k]):
            twins.append(k)
            k += 1
        k += 1
    assert len(texts) == 32 + len(twins) and twins
    assert all(answers[k] != answers[k + 1] for k in twins)


def _turned_words(text: str) -> str:
    rel = next((r for r in OPPOSITE if f" {r} " in text), None)
    return text.replace(f" {rel} ", f" {OPPOSITE[rel]} ") if rel else text


def test_finetune_follows_the_mix_and_records_it(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=16)
    mix = {
        "objectives": {"vqa": 2, "match": 2, "grounding": 1},
        "hard_kinds": {"relation": 2},
        "align_rank": 1.0,
    }
    m = run_finetune(
        "all",
        "none",
        backbone="lxmert",
        features_dir=features,
        data_dir=data,
        store_root=tmp_path / "store",
        steps=10,
        batch_size=4,
        lr=1e-3,
        config_overrides=tiny_overrides("lxmert"),
        progress=False,
        mix=mix,
    )
    history = json.loads((m.path / "history.json").read_text())
    steps = [h for h in history if h["kind"] == "train"]
    objective = ["vqa" if "vqa" in h else "match" if "match" in h else "ground" for h in steps]
    assert objective == ["vqa", "match", "ground", "vqa", "match"] * 2
    assert any("rank" in h for h in steps if "match" in h)  # the ranking term ran
    assert m.data["mix"] == {**Mix().to_dict(), **mix}


@pytest.mark.parametrize(
    "kind, parts", [("lxmert", {"pre_mlm", "pre_qa"}), ("vilbert", {"pre_align"})]
)
def test_pretrain_objective_joins_the_cycle_with_the_backbones_own_losses(tmp_path, kind, parts):
    data, features = write_tiny_split(tmp_path, "train", n=16)
    mix = {"objectives": {"vqa": 1, "match": 1, "grounding": 0, "pretrain": 1}}
    m = run_finetune(
        "all",
        "none",
        backbone=kind,
        features_dir=features,
        data_dir=data,
        store_root=tmp_path / "store",
        steps=6,
        batch_size=4,
        lr=1e-3,
        config_overrides=tiny_overrides(kind),
        progress=False,
        mix=mix,
    )
    steps = [h for h in json.loads((m.path / "history.json").read_text()) if h["kind"] == "train"]
    assert ["vqa" in h for h in steps] == [True, False, False] * 2
    assert ["pre_mlm" in h for h in steps] == [False, False, True] * 2
    assert parts <= set(steps[2]) and "match" not in steps[2]  # its match is pre_match
    assert m.data["objectives"] == ["vqa", "match", "grounding", "pretrain"]


def test_pretrain_objective_needs_the_kind_and_keeps_out_of_label_fraction_runs(tmp_path):
    data, features = write_tiny_split(tmp_path, "train", n=16)
    source = PairSource.load(data, features, "train")
    mix = Mix(objectives={"pretrain": 1})
    with pytest.raises(ValueError, match="needs the backbone kind"):
        make_objectives("vqa", source, load_tokenizer(), mix=mix)
    assert set(make_objectives("vqa", source, load_tokenizer(), mix=mix, kind="lxmert")) == {
        "vqa",
        "pretrain",
    }
    with pytest.raises(ValueError, match="label_fraction"):
        run_finetune(
            "vqa",
            "none",
            backbone="lxmert",
            features_dir=features,
            data_dir=data,
            store_root=tmp_path / "store",
            steps=1,
            label_fraction=0.5,
            config_overrides=tiny_overrides("lxmert"),
            progress=False,
            mix=mix,
        )


def test_drawn_families_leave_out_only_those_weighed_zero():
    mix = Mix.parse({"vqa_families": {"count": 3, "shape": 0, "size": 0.5}})
    assert mix.drawn_families(["count", "color", "shape", "size"]) == ["count", "color", "size"]
    assert Mix().drawn_families(["count", "shape"]) == ["count", "shape"]
