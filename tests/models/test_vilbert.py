"""ViLBERT: heads, padding and batch invariance, checkpoints (ours, BERT folders, released)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from service.models.backbone import Batch, VisionLanguageModel, build_backbone
from service.models.vilbert import ViLBertConfig, ViLBertModel, with_img_token
from service.models.vilbert_checkpoint import (
    RELEASED_MODELS,
    config_from_released,
    init_text_from_bert,
    load_released,
    map_released_keys,
    released_view,
)

ATOL = 1e-5
# Every width differs, so a swapped weight shows up as a shape error.
TINY = dict(
    vocab_size=60,
    hidden_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
    v_feature_size=12,
    v_hidden_size=20,
    v_num_hidden_layers=2,
    v_num_attention_heads=2,
    v_intermediate_size=28,
    bi_hidden_size=8,
    bi_num_attention_heads=2,
    bi_intermediate_size=8,
    t_biattention_id=[1, 2],
    v_biattention_id=[0, 1],
    v_target_size=7,
    num_answers=5,
    num_gqa_answers=4,
    embed_dim=6,
)
REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"
KEYS_JSON = REFERENCE / "vilbert_multitask_keys.json"


def tiny_model(seed: int = 0, **overrides) -> ViLBertModel:
    torch.manual_seed(seed)
    return ViLBertModel(ViLBertConfig(**{**TINY, **overrides})).eval()


def make_batch(text_lens, region_counts, seed=0) -> Batch:
    """Random items padded to the longest; padding is garbage, not zeros, so only the
    masks can keep it out of the outputs."""
    g = torch.Generator().manual_seed(seed)
    b, t, r = len(text_lens), max(text_lens), max(region_counts)
    ids = torch.randint(1, TINY["vocab_size"], (b, t), generator=g)
    types = torch.randint(0, 2, (b, t), generator=g)
    feats = torch.randn(b, r, TINY["v_feature_size"], generator=g)
    xy = torch.rand(b, r, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + torch.rand(b, r, 2, generator=g) * 0.5], -1)
    attn = (torch.arange(t)[None] < torch.tensor(text_lens)[:, None]).long()
    rmask = (torch.arange(r)[None] < torch.tensor(region_counts)[:, None]).long()
    return Batch(ids, attn, types, feats, boxes, rmask)


def pad_more(batch: Batch, t_pad: int, r_pad: int, seed=9) -> Batch:
    """The same batch with t_pad more padded tokens and r_pad more padded regions."""
    g = torch.Generator().manual_seed(seed)
    b = len(batch)
    ids = torch.randint(1, TINY["vocab_size"], (b, t_pad), generator=g)
    feats = torch.randn(b, r_pad, TINY["v_feature_size"], generator=g)
    boxes = torch.rand(b, r_pad, 4, generator=g)
    return Batch(
        torch.cat([batch.input_ids, ids], 1),
        torch.cat([batch.attention_mask, torch.zeros_like(ids)], 1),
        torch.cat([batch.token_type_ids, torch.ones_like(ids)], 1),
        torch.cat([batch.region_features, feats], 1),
        torch.cat([batch.region_boxes, boxes], 1),
        torch.cat([batch.region_mask, torch.zeros(b, r_pad, dtype=torch.long)], 1),
    )


def item(batch: Batch, i: int, t: int, r: int) -> Batch:
    """Item i alone, cut to its t real tokens and r real regions."""
    return Batch(
        batch.input_ids[i : i + 1, :t],
        batch.attention_mask[i : i + 1, :t],
        batch.token_type_ids[i : i + 1, :t],
        batch.region_features[i : i + 1, :r],
        batch.region_boxes[i : i + 1, :r],
        batch.region_mask[i : i + 1, :r],
    )


@torch.no_grad()
def outputs(model: ViLBertModel, batch: Batch) -> dict[str, torch.Tensor]:
    out = dict(model(batch))
    out["answer"] = model.answer(batch)
    out["match"] = model.match(batch)
    out["ground"] = model.ground(batch)
    out["embed_text"] = model.embed_text(batch.input_ids, batch.attention_mask)
    out["embed_image"] = model.embed_image(
        batch.region_features, batch.region_boxes, batch.region_mask
    )
    return out


def real_part(name: str, x: torch.Tensor, i: int, t: int, r: int) -> torch.Tensor:
    """Item i of an output, restricted to its real tokens / regions."""
    x = x[i]
    if name in ("mlm_logits", "token_logits"):
        return x[:t]
    if name in ("region_logits", "ground_logits", "ground"):
        return x[:r]
    return x


# ---- config ----------------------------------------------------------------------------


def test_defaults_are_the_released_bert_base_6layer_6conect():
    c = ViLBertConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert (c.vocab_size, c.max_position_embeddings, c.type_vocab_size) == (30522, 512, 2)
    assert (c.v_feature_size, c.v_hidden_size, c.v_num_hidden_layers) == (2048, 1024, 6)
    assert (c.v_num_attention_heads, c.v_intermediate_size) == (8, 1024)
    assert (c.bi_hidden_size, c.bi_num_attention_heads, c.bi_intermediate_size) == (1024, 8, 1024)
    assert c.t_biattention_id == [6, 7, 8, 9, 10, 11]
    assert c.v_biattention_id == [0, 1, 2, 3, 4, 5]
    assert (c.v_target_size, c.num_answers) == (1601, 3129)
    if KEYS_JSON.is_file():
        released = json.loads(KEYS_JSON.read_text())["config"]
        ours = asdict(c)
        shared = [k for k in released if k in ours]
        assert len(shared) >= 20
        assert {k: ours[k] for k in shared} == {k: released[k] for k in shared}


def test_config_round_trips_through_json_and_rebuilds():
    cfg = ViLBertConfig(**TINY, task_specific_tokens=True)
    d = json.loads(json.dumps(asdict(cfg)))
    assert ViLBertConfig(**d) == cfg
    model = build_backbone("vilbert", d)
    assert isinstance(model, ViLBertModel) and model.config == cfg
    assert isinstance(model, VisionLanguageModel) and model.kind == "vilbert"


def test_config_rejects_mismatched_coattention_schedule():
    with pytest.raises(ValueError, match="equal lengths"):
        ViLBertConfig(**{**TINY, "t_biattention_id": [1]})
    with pytest.raises(ValueError, match="ascending"):
        ViLBertConfig(**{**TINY, "t_biattention_id": [2, 1]})


def test_box_init_std_sets_only_the_box_projections_starting_scale():
    released, louder = tiny_model(seed=0), tiny_model(seed=0, box_init_std=0.6)
    assert released.image_embeddings.location.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert louder.image_embeddings.location.weight.std().item() == pytest.approx(0.6, rel=0.2)
    others = {k for k in released.state_dict() if k != "image_embeddings.location.weight"}
    assert all(torch.equal(released.state_dict()[k], louder.state_dict()[k]) for k in others)
    with pytest.raises(ValueError, match="box_init_std"):
        ViLBertConfig(**{**TINY, "box_init_std": 0.0})


# ---- forward / backward ------------------------------------------------------------------


def test_every_head_has_the_right_shape_and_trains():
    model = tiny_model(task_specific_tokens=True).train()
    batch = make_batch([5, 3, 4, 2], [4, 2, 3, 1])
    out = model(batch, task_id=3)
    b, t, r = 4, 5, 4
    shapes = {
        "mlm_logits": (b, t, TINY["vocab_size"]),
        "region_logits": (b, r, TINY["v_target_size"]),
        "align_logits": (b, 2),
        "answer_logits": (b, TINY["num_answers"]),
        "gqa_logits": (b, TINY["num_gqa_answers"]),
        "retrieval_logits": (b,),
        "entailment_logits": (b, 3),
        "ground_logits": (b, r),
        "token_logits": (b, t),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    pair = model.pair_logits(batch, task_id=3)
    assert pair.shape == (2, 2)
    emb_t = model.embed_text(batch.input_ids, batch.attention_mask)
    emb_v = model.embed_image(batch.region_features, batch.region_boxes, batch.region_mask)
    assert emb_t.shape == emb_v.shape == (b, TINY["embed_dim"])

    g = torch.Generator().manual_seed(1)
    terms = list(out.values()) + [pair, emb_t, emb_v]
    terms[list(out).index("ground_logits")] = out["ground_logits"] * batch.region_mask
    loss = sum((x * torch.randn(x.shape, generator=g)).sum() for x in terms)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_pair_head_needs_an_even_batch():
    with pytest.raises(ValueError, match="even"):
        tiny_model().pair_logits(make_batch([3, 3, 3], [2, 2, 2]))


def test_eval_is_deterministic_and_train_applies_dropout():
    model = tiny_model()
    batch = make_batch([5, 3], [4, 2])
    with torch.no_grad():
        assert torch.equal(model.answer(batch), model.answer(batch))
        model.train()
        assert not torch.allclose(model.answer(batch), model.answer(batch))


def test_match_is_the_log_odds_of_align_index_0():
    model = tiny_model()
    batch = make_batch([5, 3], [4, 2])
    out = outputs(model, batch)
    expected = out["align_logits"][:, 0] - out["align_logits"][:, 1]
    assert torch.allclose(out["match"], expected, atol=ATOL)


def test_ground_puts_padded_regions_at_the_most_negative_value():
    model = tiny_model()
    batch = make_batch([5, 3], [4, 2])
    ground = outputs(model, batch)["ground"]
    assert ground.shape == (2, 4)
    assert torch.isfinite(ground).all()
    assert (ground[1, 2:] == torch.finfo(ground.dtype).min).all()
    assert (ground[1, :2] > -1e3).all() and (ground[0] > -1e3).all()
    assert torch.allclose(ground.softmax(-1)[1, 2:], torch.zeros(2))


def test_img_token_is_the_mean_of_real_regions_at_the_whole_image():
    feats = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 1.0], [0.2, 0.2, 0.9, 0.9]]])
    mask = torch.tensor([[1, 1, 0]])
    f, loc, m = with_img_token(feats, boxes, mask)
    assert torch.equal(f[0, 0], torch.tensor([2.0, 4.0]))
    assert torch.equal(loc[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    assert torch.allclose(loc[0, 1:3, 4], torch.tensor([0.25, 0.5]))
    assert m.tolist() == [[1, 1, 1, 0]]


# ---- invariances -----------------------------------------------------------------------


def test_padding_changes_no_output():
    model = tiny_model()
    lens, counts = [5, 3], [4, 2]
    batch = make_batch(lens, counts)
    base = outputs(model, batch)
    padded = outputs(model, pad_more(batch, t_pad=3, r_pad=5))
    for name in base:
        for i, (t, r) in enumerate(zip(lens, counts, strict=True)):
            a = real_part(name, base[name], i, t, r)
            b = real_part(name, padded[name], i, t, r)
            assert torch.allclose(a, b, atol=ATOL), name


def test_an_item_gives_the_same_outputs_alone_and_in_a_batch():
    model = tiny_model()
    lens, counts = [5, 2, 4], [3, 4, 1]
    batch = make_batch(lens, counts, seed=3)
    together = outputs(model, batch)
    for i, (t, r) in enumerate(zip(lens, counts, strict=True)):
        alone = outputs(model, item(batch, i, t, r))
        for name in together:
            a = real_part(name, alone[name], 0, t, r)
            b = real_part(name, together[name], i, t, r)
            assert torch.allclose(a, b, atol=ATOL), (name, i)


@pytest.mark.parametrize("task_tokens", [False, True])
def test_a_caption_repeated_against_many_images_scores_as_if_alone(task_tokens):
    """Search's second stage: one caption x many images. Eval mode runs the text-only
    layers once per distinct caption; every output must still be the item's own."""
    model = tiny_model(task_specific_tokens=task_tokens)
    batch = make_batch([4, 4, 4, 2, 4], [3, 2, 4, 4, 1], seed=5)
    for i in (1, 2, 4):  # items 0, 1, 2, 4: one caption; item 3 another
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            getattr(batch, name)[i] = getattr(batch, name)[0]
    with torch.no_grad():
        together = model.match(batch)
        alone = torch.cat([model.match(item(batch, i, 4, 4)) for i in range(len(batch))])
        answers = model.answer(batch)
        answers_alone = torch.cat([model.answer(item(batch, i, 4, 4)) for i in range(5)])
    assert torch.allclose(together, alone, atol=ATOL)
    assert torch.allclose(answers, answers_alone, atol=ATOL)


def test_task_token_changes_outputs_but_keeps_token_positions():
    model = tiny_model(task_specific_tokens=True)
    batch = make_batch([5, 3], [4, 2])
    with torch.no_grad():
        plain, vqa, other = model(batch), model(batch, task_id=1), model(batch, task_id=2)
    assert vqa["mlm_logits"].shape == plain["mlm_logits"].shape
    assert not torch.allclose(vqa["answer_logits"], other["answer_logits"])
    with torch.no_grad():  # the protocol methods use config.task_ids
        assert torch.allclose(model.answer(batch), vqa["answer_logits"], atol=ATOL)
    with pytest.raises(ValueError, match="task_specific_tokens"):
        tiny_model()(batch, task_id=1)


# ---- checkpoints: ours -------------------------------------------------------------------


def test_safetensors_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model(seed=0)
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    other = tiny_model(seed=1)
    batch = make_batch([5, 3], [4, 2])
    assert not torch.allclose(outputs(model, batch)["answer"], outputs(other, batch)["answer"])
    other.load_state_dict(load_file(str(path)), strict=True)
    a, b = outputs(model, batch), outputs(other, batch)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- checkpoints: BERT folders -----------------------------------------------------------

BERT_TINY = dict(
    vocab_size=60,
    hidden_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
    type_vocab_size=2,
)


def write_tiny_bert(folder: Path) -> BertModel:
    torch.manual_seed(5)
    bert = BertModel(BertConfig(**BERT_TINY)).eval()
    bert.save_pretrained(folder)
    return bert


def test_text_stream_from_a_bert_folder_reproduces_bert(tmp_path):
    bert = write_tiny_bert(tmp_path)
    # co-attention off; bi_hidden = hidden so BERT's pooler dense fits ours
    model = tiny_model(seed=1, t_biattention_id=[], v_biattention_id=[], bi_hidden_size=16)
    loaded = init_text_from_bert(model, tmp_path)
    assert "text_layers.2.ffn.ln.weight" in loaded and "text_pooler.weight" in loaded
    batch = make_batch([7, 4], [3, 2])
    with torch.no_grad():
        expected = bert(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            token_type_ids=batch.token_type_ids,
        ).last_hidden_state
        stream = model.text_stream(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        encoded = model.encode(batch)["sequence_output_t"]
    assert torch.allclose(stream, expected, atol=ATOL)
    assert torch.allclose(encoded, expected, atol=ATOL)
    assert torch.equal(model.text_pooler.weight, bert.pooler.dense.weight)


def test_bert_folder_with_other_widths_is_refused(tmp_path):
    write_tiny_bert(tmp_path)
    with pytest.raises(ValueError, match="hidden_size"):
        init_text_from_bert(tiny_model(hidden_size=32), tmp_path)
    with pytest.raises(ValueError, match="layers"):
        init_text_from_bert(tiny_model(num_hidden_layers=4, t_biattention_id=[1, 4]), tmp_path)


def test_text_stream_from_the_minilm_folder_reproduces_bert():
    from service.data.tokenizer import load_tokenizer, minilm_dir

    folder = minilm_dir()
    cfg = dict(TINY, hidden_size=384, num_hidden_layers=6, num_attention_heads=12)
    cfg.update(intermediate_size=1536, vocab_size=30522, max_position_embeddings=512)
    cfg.update(t_biattention_id=[], v_biattention_id=[])
    model = tiny_model(**cfg)
    init_text_from_bert(model, folder)
    bert = BertModel.from_pretrained(str(folder)).eval()
    enc = load_tokenizer()(
        ["what colour is the circle?", "a small red triangle above a blue square"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = bert(**enc).last_hidden_state
        ours = model.text_stream(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert torch.allclose(ours, expected, atol=ATOL)


# ---- checkpoints: released ViLBERT -------------------------------------------------------


def released_listing() -> dict:
    if not KEYS_JSON.is_file():
        pytest.skip(f"released key listing not found at {KEYS_JSON} (../shared/reference)")
    return json.loads(KEYS_JSON.read_text())


@pytest.mark.parametrize("name", RELEASED_MODELS)
def test_released_state_dict_loads_strictly(name):
    listing = released_listing()
    entry = listing["models"][name]
    cfg = config_from_released(listing["config"], entry["config_overrides"])
    with torch.device("meta"):  # full size (~270M parameters) without allocating it
        model = ViLBertModel(cfg)
    state = {k: torch.zeros(shape, device="meta") for k, shape in entry["state_dict"].items()}
    mapped = map_released_keys(state, name)
    view = released_view(model, name)
    ours = view.state_dict()
    assert sorted(mapped) == sorted(ours)
    assert [k for k in mapped if mapped[k].shape != ours[k].shape] == []
    left = load_released(model, state, name, assign=True)  # strict=True inside
    # dropped: the tied decoder copy and the unused q_dense1/q_dense2 of each co-layer
    assert len(state) - len(mapped) == 1 + 4 * len(cfg.v_biattention_id)
    q_dense = sum(math.prod(s) for k, s in entry["state_dict"].items() if ".q_dense" in k)
    n_params = sum(p.numel() for p in view.parameters())
    assert n_params == entry["num_parameters_unique"] - q_dense
    expected_left = {"dual"} if name == "VILBertForVLTasks" else {"dual", "answer_head"}
    assert expected_left <= {k.split(".")[0] for k in left}
    assert not any(k.split(".")[0] in {"text_layers", "co_layers", "mlm_head"} for k in left)


def test_released_mapping_rejects_unknown_and_foreign_keys():
    with pytest.raises(KeyError, match="no ViLBERT mapping"):
        map_released_keys({"bert.encoder.x_layer.0.w.weight": torch.zeros(1)}, RELEASED_MODELS[0])
    with pytest.raises(KeyError, match="not part of"):
        map_released_keys({"vil_logit.bias": torch.zeros(1)}, "BertForMultiModalPreTraining")
    untied = {
        "bert.embeddings.word_embeddings.weight": torch.zeros(3, 2),
        "cls.predictions.decoder.weight": torch.ones(3, 2),
    }
    with pytest.raises(ValueError, match="decoder"):
        map_released_keys(untied, RELEASED_MODELS[0])


def test_released_unsupported_settings_are_refused():
    with pytest.raises(ValueError, match="dynamic_attention"):
        config_from_released({**TINY, "dynamic_attention": True})


def _released_co_layer(w: dict, t, t_mask, v, v_mask, heads: int):
    """The released BertConnectionLayer's arithmetic, on released key names (eval mode)."""

    def lin(x, name):
        return F.linear(x, w[name + ".weight"], w[name + ".bias"])

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], 1e-12)

    def split(x):
        return x.view(*x.shape[:2], heads, -1).transpose(1, 2)

    def attend(q, k, val, mask):
        s = split(q) @ split(k).transpose(-1, -2) / math.sqrt(split(q).shape[-1]) + mask
        return (s.softmax(-1) @ split(val)).transpose(1, 2).flatten(2)

    p = "biattention."
    ctx1 = attend(lin(t, p + "query2"), lin(v, p + "key1"), lin(v, p + "value1"), v_mask)
    ctx2 = attend(lin(v, p + "query1"), lin(t, p + "key2"), lin(t, p + "value2"), t_mask)
    v_att = ln(lin(ctx2, "biOutput.dense1") + v, "biOutput.LayerNorm1")
    t_att = ln(lin(ctx1, "biOutput.dense2") + t, "biOutput.LayerNorm2")
    v_out = ln(
        lin(F.gelu(lin(v_att, "v_intermediate.dense")), "v_output.dense") + v_att,
        "v_output.LayerNorm",
    )
    t_out = ln(
        lin(F.gelu(lin(t_att, "t_intermediate.dense")), "t_output.dense") + t_att,
        "t_output.LayerNorm",
    )
    return t_out, v_out


def test_released_co_layer_weights_compute_what_the_released_layer_computes():
    model = tiny_model()
    ours = model.co_layers[0]
    # random weights under released names, shaped from the inverse of our mapping
    g = torch.Generator().manual_seed(4)
    names = {
        "biattention." + n: None for n in ("query1", "key1", "value1", "query2", "key2", "value2")
    }
    names.update({"biOutput." + n: None for n in ("dense1", "dense2", "LayerNorm1", "LayerNorm2")})
    for side in ("t", "v"):
        names.update({f"{side}_intermediate.dense": None, f"{side}_output.dense": None})
        names[f"{side}_output.LayerNorm"] = None
    released = {}
    prefix = "bert.encoder.c_layer.0."
    for name in names:
        for param in ("weight", "bias"):
            key = prefix + name + "." + param
            ours_key = next(iter(map_released_keys({key: torch.zeros(1)}, RELEASED_MODELS[0])))
            shape = model.state_dict()[ours_key].shape
            released[key] = torch.randn(shape, generator=g) * 0.3
    mapped = map_released_keys(released, RELEASED_MODELS[0])
    model.load_state_dict(mapped, strict=False)
    t = torch.randn(2, 5, TINY["hidden_size"], generator=g)
    v = torch.randn(2, 4, TINY["v_hidden_size"], generator=g)
    t_mask = torch.tensor([[0.0] * 5, [0.0] * 3 + [-1e4] * 2])[:, None, None]
    v_mask = torch.tensor([[0.0] * 4, [0.0] * 2 + [-1e4] * 2])[:, None, None]
    w = {k.removeprefix(prefix): x for k, x in released.items()}
    expected_t, expected_v = _released_co_layer(
        w, t, t_mask, v, v_mask, TINY["bi_num_attention_heads"]
    )
    with torch.no_grad():
        got_t, got_v = ours(t, t_mask, v, v_mask)
    assert torch.allclose(got_t, expected_t, atol=ATOL)
    assert torch.allclose(got_v, expected_v, atol=ATOL)
