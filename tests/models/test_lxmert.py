"""LXMERT backbone: heads, padding and batch invariance, checkpoints (ours and Hugging Face)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering

from service.models.backbone import Batch, VisionLanguageModel, build_backbone
from service.models.lxmert import (
    LxmertBackbone,
    LxmertBackboneConfig,
    from_pretrained_folder,
)

ATOL = 1e-5
TINY = dict(
    vocab_size=60,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=37,
    l_layers=1,
    x_layers=1,
    r_layers=1,
    visual_feat_dim=16,
    num_qa_labels=7,
    num_object_labels=11,
    num_attr_labels=5,
    embed_dim=8,
    max_position_embeddings=64,
)
OUR_HEADS = ("extra_heads.grounding", "extra_heads.text_proj", "extra_heads.image_proj")


def tiny_model(seed: int = 0) -> LxmertBackbone:
    torch.manual_seed(seed)
    return LxmertBackbone(LxmertBackboneConfig(**TINY)).eval()


def make_batch(text_lens, region_counts, seed=0) -> Batch:
    """Random items padded to the longest; padding is garbage, not zeros, so only the
    masks can keep it out of the outputs."""
    g = torch.Generator().manual_seed(seed)
    b, t, r, f = len(text_lens), max(text_lens), max(region_counts), TINY["visual_feat_dim"]
    ids = torch.randint(1, TINY["vocab_size"], (b, t), generator=g)
    feats = torch.randn(b, r, f, generator=g)
    xy = torch.rand(b, r, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + torch.rand(b, r, 2, generator=g) * 0.5], -1)
    attn = (torch.arange(t)[None] < torch.tensor(text_lens)[:, None]).long()
    rmask = (torch.arange(r)[None] < torch.tensor(region_counts)[:, None]).long()
    return Batch(ids, attn, torch.zeros_like(ids), feats, boxes, rmask)


def pad_more(batch: Batch, t_pad: int, r_pad: int, seed=9) -> Batch:
    """The same batch with t_pad more padded tokens and r_pad more padded regions."""
    g = torch.Generator().manual_seed(seed)
    b, f = len(batch), batch.region_features.shape[-1]
    ids = torch.randint(1, TINY["vocab_size"], (b, t_pad), generator=g)
    zeros_t, zeros_r = (
        torch.zeros(b, t_pad, dtype=torch.long),
        torch.zeros(b, r_pad, dtype=torch.long),
    )
    return Batch(
        torch.cat([batch.input_ids, ids], 1),
        torch.cat([batch.attention_mask, zeros_t], 1),
        torch.cat([batch.token_type_ids, zeros_t], 1),
        torch.cat([batch.region_features, 10 * torch.randn(b, r_pad, f, generator=g)], 1),
        torch.cat([batch.region_boxes, torch.rand(b, r_pad, 4, generator=g)], 1),
        torch.cat([batch.region_mask, zeros_r], 1),
    )


def item_batch(full: Batch, i: int) -> Batch:
    """Item i of `full` alone, cut to its real tokens and regions."""
    t, r = int(full.attention_mask[i].sum()), int(full.region_mask[i].sum())
    return Batch(
        full.input_ids[i : i + 1, :t],
        full.attention_mask[i : i + 1, :t],
        full.token_type_ids[i : i + 1, :t],
        full.region_features[i : i + 1, :r],
        full.region_boxes[i : i + 1, :r],
        full.region_mask[i : i + 1, :r],
    )


@torch.no_grad()
def all_outputs(model: LxmertBackbone, batch: Batch) -> dict[str, torch.Tensor]:
    out = model(batch)
    out["answer"] = model.answer(batch)
    out["match"] = model.match(batch)
    out["ground"] = model.ground(batch)
    out["embed_text"] = model.embed_text(batch.input_ids, batch.attention_mask)
    out["embed_image"] = model.embed_image(
        batch.region_features, batch.region_boxes, batch.region_mask
    )
    return out


def real_part(out: dict[str, torch.Tensor], i: int, t: int, r: int) -> dict[str, torch.Tensor]:
    """Item i's outputs at its real tokens (first t) and real regions (first r)."""
    token_keys, region_keys = {"mlm_logits"}, {"obj_logits", "attr_logits", "feat_regression"}
    region_keys |= {"ground_logits", "ground"}
    part = {}
    for k, v in out.items():
        v = v[i]
        if k in token_keys:
            v = v[:t]
        elif k in region_keys:
            v = v[:r]
        part[k] = v
    return part


def assert_close_dicts(a, b, atol=ATOL):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"output {k!r} differs")


def test_meets_protocol_and_shapes():
    model = tiny_model()
    assert isinstance(model, VisionLanguageModel) and model.kind == "lxmert"
    batch = make_batch([5, 3], [4, 2])
    out = all_outputs(model, batch)
    b, t, r = 2, 5, 4
    expected = {
        "mlm_logits": (b, t, 60),
        "match_logits": (b, 2),
        "obj_logits": (b, r, 11),
        "attr_logits": (b, r, 5),
        "feat_regression": (b, r, 16),
        "answer_logits": (b, 7),
        "ground_logits": (b, r),
        "answer": (b, 7),
        "match": (b,),
        "ground": (b, r),
        "embed_text": (b, 8),
        "embed_image": (b, 8),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    for k in ("embed_text", "embed_image"):
        torch.testing.assert_close(out[k].norm(dim=-1), torch.ones(b))
    # item 1 has 2 real regions: its 2 padded ones can never be chosen
    assert (out["ground"][1, 2:] == torch.finfo(torch.float32).min).all()
    assert out["ground"][1, :2].gt(-1e3).all()


def test_forward_and_backward_reach_every_head():
    model = tiny_model().train()
    batch = make_batch([5, 3], [4, 2])
    out = model(batch)
    text = model.embed_text(batch.input_ids, batch.attention_mask)
    image = model.embed_image(batch.region_features, batch.region_boxes, batch.region_mask)
    real = batch.region_mask.bool()
    loss = (
        out["mlm_logits"].logsumexp(-1).mean()
        + out["match_logits"].logsumexp(-1).mean()
        + out["obj_logits"][real].logsumexp(-1).mean()
        + out["attr_logits"][real].logsumexp(-1).mean()
        + out["feat_regression"][real].pow(2).mean()
        + out["answer_logits"].logsumexp(-1).mean()
        + out["ground_logits"][real].mean()
        + (text * image).sum()
    )
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    zero_grad = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    # transformers gives token_type_embeddings padding_idx=0, so with every token of
    # type 0 (our collate's single-segment input) that row is frozen: as in HF LXMERT.
    assert zero_grad == ["lxmert.embeddings.token_type_embeddings.weight"]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_padding_changes_no_output():
    model = tiny_model()
    lens, regions = [6, 3, 4], [5, 2, 3]
    batch = make_batch(lens, regions, seed=1)
    tight = all_outputs(model, batch)
    padded = all_outputs(model, pad_more(batch, t_pad=4, r_pad=3))
    for i, (t, r) in enumerate(zip(lens, regions, strict=True)):
        assert_close_dicts(real_part(tight, i, t, r), real_part(padded, i, t, r))


def test_item_alone_equals_item_in_batch():
    model = tiny_model()
    lens, regions = [6, 2, 4], [3, 5, 1]
    batch = make_batch(lens, regions, seed=2)
    together = all_outputs(model, batch)
    for i, (t, r) in enumerate(zip(lens, regions, strict=True)):
        alone = all_outputs(model, item_batch(batch, i))
        assert_close_dicts(real_part(alone, 0, t, r), real_part(together, i, t, r))


def test_repeated_texts_and_images_give_each_items_own_outputs():
    """One caption against several images (search) and several questions about one
    image (VQA): eval mode runs each single-modality encoder once per distinct input;
    every output must still be the item's own."""
    model = tiny_model()
    lens, regions = [5, 5, 5, 3, 4], [3, 2, 4, 4, 4]
    batch = make_batch(lens, regions, seed=7)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        getattr(batch, name)[1:3] = getattr(batch, name)[0]  # items 0-2: one caption
    for name in ("region_features", "region_boxes", "region_mask"):
        getattr(batch, name)[3:] = getattr(batch, name)[2]  # items 2-4: one image
    together = all_outputs(model, batch)
    for i, (t, r) in enumerate(zip(lens, regions, strict=True)):
        alone = all_outputs(model, item_batch(batch, i))
        assert_close_dicts(real_part(alone, 0, t, r), real_part(together, i, t, r))


def test_training_mode_encodes_as_transformers_lxmert_model():
    torch.manual_seed(0)
    config = {**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = LxmertBackbone(LxmertBackboneConfig(**config)).train()
    batch = make_batch([6, 3], [5, 2], seed=8)
    ref = model.lxmert(**hf_inputs(batch))
    lang, vision, pooled = model.encode(batch)
    torch.testing.assert_close(lang, ref.language_output, atol=1e-6, rtol=0)
    torch.testing.assert_close(vision, ref.vision_output, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, ref.pooled_output, atol=1e-6, rtol=0)


def test_safetensors_round_trip(tmp_path):
    model = tiny_model(seed=0)
    save_file(model.state_dict(), tmp_path / "model.safetensors")  # no shared tensors
    other = tiny_model(seed=1)
    batch = make_batch([5, 3], [4, 2])
    before = all_outputs(other, batch)["answer"]
    other.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert not torch.allclose(before, all_outputs(model, batch)["answer"])
    assert_close_dicts(all_outputs(model, batch), all_outputs(other, batch), atol=0)


def test_config_is_the_paper_and_rebuilds_from_json():
    config = LxmertBackboneConfig()
    assert (config.l_layers, config.x_layers, config.r_layers) == (9, 5, 5)
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (
        768,
        12,
        3072,
    )
    assert (config.visual_feat_dim, config.visual_pos_dim) == (2048, 4)
    assert (config.num_object_labels, config.num_attr_labels, config.vocab_size) == (
        1600,
        400,
        30522,
    )
    hf, ref = config.to_hf(), LxmertConfig()
    for name in ("hidden_size", "l_layers", "x_layers", "r_layers", "num_qa_labels"):
        assert getattr(hf, name) == getattr(ref, name)
    assert not hasattr(hf, "word_check") and not hasattr(hf, "embed_dim")  # ours alone
    assert LxmertBackboneConfig.from_hf(hf) == config
    tiny = LxmertBackboneConfig(**TINY)
    rebuilt = build_backbone("lxmert", json.loads(json.dumps(asdict(tiny))))
    assert isinstance(rebuilt, LxmertBackbone) and rebuilt.config == tiny


# --- Hugging Face folders -------------------------------------------------------------


def tiny_hf_config(**overrides) -> LxmertConfig:
    fields = {k: v for k, v in TINY.items() if k != "embed_dim"}
    return LxmertConfig(**{**fields, **overrides})


def hf_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return dict(
        input_ids=batch.input_ids,
        visual_feats=batch.region_features,
        visual_pos=batch.region_boxes,
        attention_mask=batch.attention_mask,
        visual_attention_mask=batch.region_mask,
        token_type_ids=batch.token_type_ids,
    )


def test_hf_question_answering_folder_gives_identical_answers(tmp_path):
    torch.manual_seed(3)
    hf = LxmertForQuestionAnswering(tiny_hf_config()).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = from_pretrained_folder(tmp_path).eval()
    assert "answer_head" not in ours.fresh_heads
    assert {"cls.predictions", "cls.seq_relationship", *OUR_HEADS} <= set(ours.fresh_heads)
    batch = make_batch([6, 3], [5, 2], seed=4)
    with torch.no_grad():
        expected = hf(**hf_inputs(batch)).question_answering_score
        got = ours.answer(batch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_hf_pretraining_folder_loads_every_head(tmp_path):
    torch.manual_seed(5)
    hf = LxmertForPreTraining(tiny_hf_config()).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = from_pretrained_folder(tmp_path).eval()
    assert ours.fresh_heads == OUR_HEADS
    batch = make_batch([6, 3], [5, 2], seed=6)
    with torch.no_grad():
        ref = hf(**hf_inputs(batch))
        vision = hf.lxmert(**hf_inputs(batch)).vision_output
        ref_visual = hf.obj_predict_head(vision)
        out = ours(batch)
        match = ours.match(batch)
    s = ref.cross_relationship_score
    torch.testing.assert_close(out["match_logits"], s, atol=1e-6, rtol=0)
    torch.testing.assert_close(match, s[:, 1] - s[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out["mlm_logits"], ref.prediction_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        out["answer_logits"], ref.question_answering_score, atol=1e-6, rtol=0
    )
    for key, ours_key in (("obj", "obj_logits"), ("attr", "attr_logits")):
        torch.testing.assert_close(out[ours_key], ref_visual[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(out["feat_regression"], ref_visual["feat"], atol=1e-6, rtol=0)


def test_pickle_only_folder_is_refused(tmp_path):
    tiny_hf_config().to_json_file(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="pickle"):
        from_pretrained_folder(tmp_path)


def test_unexpected_or_partial_keys_are_errors(tmp_path):
    torch.manual_seed(7)
    LxmertForQuestionAnswering(tiny_hf_config()).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({**state, "answer_head.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="answer_head.extra.weight"):
        from_pretrained_folder(tmp_path)
    del state["answer_head.logit_fc.3.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="part of head 'answer_head'"):
        from_pretrained_folder(tmp_path)
