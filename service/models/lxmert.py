"""LXMERT (Tan & Bansal, EMNLP 2019) on transformers' Lxmert classes.

The encoder is `transformers.LxmertModel`, kept under the attribute `lxmert`, and the
heads mirror `LxmertForPreTraining`'s module names (`cls`, `obj_predict_head`,
`answer_head`), so a Hugging Face folder of either `LxmertForQuestionAnswering` or
`LxmertForPreTraining` loads by key name. Heads no public checkpoint has (per-region
grounding and the single-modality embedding projections) live apart, in `extra_heads`.

Notes on the transformers implementation, checked here and in the tests:
- `visual_attention_mask` reaches every place a region is attended to: the r_layers'
  self-attention, the language->vision cross-attention and the vision self-attention of
  every cross layer. Padded regions and tokens therefore change no real output; no
  workaround is needed in this wrapper.
- `visual_pos` is the normalised box (x1/W, y1/H, x2/W, y2/H) as in airsplay/lxmert,
  which is exactly `Batch.region_boxes`.
- The masked-LM decoder is tied to the word embeddings. We compute it from the
  embedding matrix instead of holding a second Parameter, so our state dict has no
  shared tensors and `safetensors.torch.save_file(model.state_dict())` just works.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import LxmertConfig, LxmertModel
from transformers.models.lxmert.modeling_lxmert import (
    LxmertPredictionHeadTransform,
    LxmertVisualAnswerHead,
    LxmertVisualObjHead,
)

from service.models.backbone import (
    WORD_CHECK_PRIOR,
    Batch,
    masked_mean,
    once_per_distinct_row,
    word_checked,
)

logger = logging.getLogger(__name__)

TIED_DECODER_KEY = "cls.predictions.decoder.weight"
WORD_EMBEDDINGS_KEY = "lxmert.embeddings.word_embeddings.weight"

# Heads a checkpoint folder may lack; each is either loaded whole or left fresh.
HEAD_UNITS = (
    "answer_head",
    "cls.predictions",
    "cls.seq_relationship",
    "obj_predict_head.transform",
    "obj_predict_head.decoder_dict.obj",
    "obj_predict_head.decoder_dict.attr",
    "obj_predict_head.decoder_dict.feat",
    "extra_heads.grounding",
    "extra_heads.text_proj",
    "extra_heads.image_proj",
)


OUR_FIELDS = ("embed_dim", "word_check")  # config fields no Hugging Face config has


@dataclass
class LxmertBackboneConfig:
    """LXMERT's size and heads. Defaults are the paper's (= unc-nlp/lxmert-base-uncased).

    `num_qa_labels` is 9,500 as in pretraining (3,129 for a VQA v2 fine-tune).
    `embed_dim` sizes our single-modality embeddings for the first stage of gallery
    search; it is not part of any Hugging Face checkpoint.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    l_layers: int = 9  # language encoder
    x_layers: int = 5  # cross-modality encoder
    r_layers: int = 5  # object-relationship encoder
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4
    num_qa_labels: int = 9500
    num_object_labels: int = 1600
    num_attr_labels: int = 400
    embed_dim: int = 256
    word_check: bool = False  # ours: per-token "false of the image" head (`match_words`)
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    initializer_range: float = 0.02

    def to_hf(self) -> LxmertConfig:
        """The transformers config for the encoder and the Hugging Face heads."""
        fields = asdict(self)
        for ours in OUR_FIELDS:
            fields.pop(ours)
        return LxmertConfig(**fields)

    @classmethod
    def from_hf(cls, hf: LxmertConfig, embed_dim: int | None = None) -> LxmertBackboneConfig:
        names = [f for f in cls.__dataclass_fields__ if f not in OUR_FIELDS]
        config = cls(**{name: getattr(hf, name) for name in names})
        if embed_dim is not None:
            config.embed_dim = embed_dim
        return config

    def to_dict(self) -> dict:
        return asdict(self)


class LxmertMaskedLMHead(nn.Module):
    """`LxmertLMPredictionHead` whose decoder is the word-embedding matrix, passed in."""

    def __init__(self, hf: LxmertConfig):
        super().__init__()
        self.transform = LxmertPredictionHeadTransform(hf)
        self.bias = nn.Parameter(torch.zeros(hf.vocab_size))

    def forward(self, language_output: Tensor, word_embeddings: Tensor) -> Tensor:
        h = self.transform(language_output)  # (B, T, H)
        return F.linear(h, word_embeddings, self.bias)  # (B, T, V)


class LxmertPretrainingHeads(nn.Module):
    """`LxmertPreTrainingHeads`, same keys, without a second copy of the tied decoder."""

    def __init__(self, hf: LxmertConfig):
        super().__init__()
        self.predictions = LxmertMaskedLMHead(hf)
        # 2-way; index 1 = "the text matches the image" (transformers' matched_label 1).
        self.seq_relationship = nn.Linear(hf.hidden_size, 2)


class LxmertExtraHeads(nn.Module):
    """Our heads, in no Hugging Face checkpoint: grounding, dual-encoder projections and,
    when configured, the word check."""

    def __init__(self, hidden_size: int, embed_dim: int, word_check: bool = False):
        super().__init__()
        self.grounding = nn.Linear(hidden_size, 1)  # per-region logit on vision_output
        self.text_proj = nn.Linear(hidden_size, embed_dim)
        self.image_proj = nn.Linear(hidden_size, embed_dim)
        # per-token logit on language_output: the word is false of the image
        self.word_check = nn.Linear(hidden_size, 1) if word_check else None


class LxmertBackbone(nn.Module):
    """LXMERT encoder plus every head, meeting the `VisionLanguageModel` protocol."""

    kind = "lxmert"

    def __init__(self, config: LxmertBackboneConfig):
        super().__init__()
        self.config = config
        hf = config.to_hf()
        self.lxmert = LxmertModel(hf)  # initialised by transformers' post_init
        self.cls = LxmertPretrainingHeads(hf)
        self.obj_predict_head = LxmertVisualObjHead(hf)  # obj, attr, feat decoders
        self.answer_head = LxmertVisualAnswerHead(hf, config.num_qa_labels)
        self.extra_heads = LxmertExtraHeads(config.hidden_size, config.embed_dim, config.word_check)
        for head in (self.cls, self.obj_predict_head, self.answer_head, self.extra_heads):
            head.apply(self._init_head)
        if self.extra_heads.word_check is not None:
            nn.init.constant_(self.extra_heads.word_check.bias, WORD_CHECK_PRIOR)
        self.fresh_heads: tuple[str, ...] = ()  # set by from_pretrained_folder

    def _init_head(self, module: nn.Module) -> None:
        """As transformers initialises LXMERT: N(0, initializer_range), zero bias."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # --- encoders -------------------------------------------------------------------

    def encode(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Full LXMERT: (language_output (B,T,H), vision_output (B,R,H), pooled (B,H)).

        LxmertModel's forward step by step, so that in eval mode the two single-modality
        encoders run once per distinct text and once per distinct image of the batch (a
        caption against 50 images in search; several questions about one image).
        """
        text = (batch.input_ids, batch.token_type_ids, batch.attention_mask)
        image = (batch.region_features, batch.region_boxes, batch.region_mask)
        if self.training:
            lang, vision = self._language(*text), self.encode_image(*image)
        else:
            lang = once_per_distinct_row(self._language, *text)
            vision = once_per_distinct_row(self.encode_image, *image)
        lang_mask = self._additive_mask(batch.attention_mask)
        vision_mask = self._additive_mask(batch.region_mask)
        for layer in self.lxmert.encoder.x_layers:
            lang, vision = layer(lang, lang_mask, vision, vision_mask)[:2]
        return lang, vision, self.lxmert.pooler(lang)

    def _additive_mask(self, mask: Tensor) -> Tensor:
        """(B, N) 1/0 mask -> (B, 1, 1, N) additive mask, as LxmertModel builds it."""
        dtype = self.lxmert.dtype
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def _language(self, input_ids: Tensor, token_type_ids: Tensor, attention_mask: Tensor):
        """Embeddings + l_layers: (B, T, H)."""
        h = self.lxmert.embeddings(input_ids, token_type_ids)
        mask = self._additive_mask(attention_mask)
        for layer in self.lxmert.encoder.layer:
            h = layer(h, mask)[0]
        return h

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Language encoder alone (embeddings + l_layers), token types 0: (B, T, H)."""
        return self._language(input_ids, torch.zeros_like(input_ids), attention_mask)

    def encode_image(self, region_features: Tensor, region_boxes: Tensor, region_mask: Tensor):
        """Object-relationship encoder alone (visual embedding + r_layers): (B, R, H)."""
        v = self.lxmert.encoder.visn_fc(region_features, region_boxes)
        mask = self._additive_mask(region_mask)
        for layer in self.lxmert.encoder.r_layers:
            v = layer(v, mask)[0]
        return v

    # --- the VisionLanguageModel protocol -------------------------------------------

    def answer(self, batch: Batch) -> Tensor:
        """VQA logits: (B, num_qa_labels)."""
        return self.answer_head(self.encode(batch)[2])

    def match(self, batch: Batch) -> Tensor:
        """Logit that the text matches the image: (B,); with a word check, also that no
        word of it is false (`backbone.word_checked`).

        transformers' `cross_relationship_score` is 2-way with index 1 = matched
        (`matched_label` 1), so P(match) = softmax(s)[1] = sigmoid(s1 - s0).
        """
        return word_checked(*self.match_words(batch), batch.attention_mask)

    def match_words(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """(head logit (B,), word-check logits (B, T) or None): see `match`."""
        lang, _, pooled = self.encode(batch)
        s = self.cls.seq_relationship(pooled)  # (B, 2)
        check = self.extra_heads.word_check
        words = None if check is None else check(lang).squeeze(-1)
        return s[:, 1] - s[:, 0], words

    def ground(self, batch: Batch) -> Tensor:
        """Per-region logits (B, R); padded regions get the dtype's most negative value.

        A finite value rather than -inf keeps softmax and BCE-with-logits NaN-free.
        """
        return self._ground_logits(self.encode(batch)[1], batch.region_mask)

    def _ground_logits(self, vision_output: Tensor, region_mask: Tensor) -> Tensor:
        logits = self.extra_heads.grounding(vision_output).squeeze(-1)  # (B, R)
        return logits.masked_fill(region_mask == 0, torch.finfo(logits.dtype).min)

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Masked mean of the language encoder, projected, L2-normalised: (B, embed_dim)."""
        h = masked_mean(self.encode_text(input_ids, attention_mask), attention_mask)
        return F.normalize(self.extra_heads.text_proj(h), dim=-1)

    def embed_image(self, region_features: Tensor, region_boxes: Tensor, region_mask: Tensor):
        """Masked mean of the relationship encoder, projected, L2-normalised: (B, embed_dim)."""
        v = self.encode_image(region_features, region_boxes, region_mask)
        v = masked_mean(v, region_mask)
        return F.normalize(self.extra_heads.image_proj(v), dim=-1)

    # --- every head from one pass, for training --------------------------------------

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """All head outputs from one encoder pass.

        mlm_logits (B,T,V), match_logits (B,2) [index 1 = matched], obj_logits
        (B,R,num_object_labels), attr_logits (B,R,num_attr_labels), feat_regression
        (B,R,visual_feat_dim), answer_logits (B,num_qa_labels), ground_logits (B,R).
        """
        lang, vision, pooled = self.encode(batch)
        visual = self.obj_predict_head(vision)
        return {
            "mlm_logits": self.cls.predictions(lang, self.lxmert.embeddings.word_embeddings.weight),
            "match_logits": self.cls.seq_relationship(pooled),
            "obj_logits": visual["obj"],
            "attr_logits": visual["attr"],
            "feat_regression": visual["feat"],
            "answer_logits": self.answer_head(pooled),
            "ground_logits": self._ground_logits(vision, batch.region_mask),
        }

    def pretrain_outputs(self, batch: Batch) -> dict[str, Tensor]:
        """The outputs of LXMERT's five pretraining objectives (and grounding): see forward."""
        return self(batch)


# --- Hugging Face checkpoint folders ---------------------------------------------------


def _read_safetensors(folder: Path) -> dict[str, Tensor]:
    """The folder's weights, single file or sharded; pickled weights are refused."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
    if pickles:
        raise ValueError(
            f"{folder} holds only pickled weights ({', '.join(sorted(pickles))}); we never "
            "load pickles. Convert the folder to model.safetensors offline, in a sandbox you "
            "trust, e.g. LxmertForQuestionAnswering.from_pretrained(folder)"
            ".save_pretrained(out, safe_serialization=True)."
        )
    raise FileNotFoundError(f"no model.safetensors in {folder}")


def _normalise_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Prefix a bare `LxmertModel` folder's keys with `lxmert.`; drop the tied decoder."""
    if not any(k.startswith("lxmert.") for k in state):
        state = {f"lxmert.{k}": v for k, v in state.items()}
    if TIED_DECODER_KEY in state:
        decoder = state.pop(TIED_DECODER_KEY)
        if WORD_EMBEDDINGS_KEY in state and not torch.equal(decoder, state[WORD_EMBEDDINGS_KEY]):
            raise ValueError("checkpoint has an untied MLM decoder; only tied decoders load")
    return state


def load_hf_weights(model: LxmertBackbone, state: dict[str, Tensor]) -> list[str]:
    """Load a Hugging Face LXMERT state dict by key name; return the heads left fresh.

    Every key the checkpoint holds must exist in the model (unexpected keys are an
    error), the whole `lxmert` encoder must be present, and each head in HEAD_UNITS
    is loaded whole or not at all.
    """
    state = _normalise_keys(state)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise KeyError(f"checkpoint keys not in LxmertBackbone: {unexpected[:10]}")
    missing = set(own) - set(state)
    missing_encoder = sorted(k for k in missing if k.startswith("lxmert."))
    if missing_encoder:
        raise KeyError(f"checkpoint lacks encoder weights: {missing_encoder[:10]}")
    fresh = []
    for unit in HEAD_UNITS:
        keys = {k for k in own if k.startswith(unit + ".")}
        absent = keys & missing
        if absent == keys:
            fresh.append(unit)
        elif absent:
            raise KeyError(f"checkpoint has part of head {unit!r}; missing {sorted(absent)}")
    model.load_state_dict(state, strict=False)
    return fresh


def from_pretrained_folder(
    folder: str | os.PathLike, embed_dim: int | None = None
) -> LxmertBackbone:
    """Build from a Hugging Face LXMERT folder (config.json + model.safetensors).

    Works for `LxmertForQuestionAnswering`, `LxmertForPreTraining` and bare `LxmertModel`
    folders. Heads the folder lacks stay freshly initialised; their names are logged
    and kept in `model.fresh_heads`.
    """
    folder = Path(folder)
    hf = LxmertConfig.from_json_file(str(folder / "config.json"))
    model = LxmertBackbone(LxmertBackboneConfig.from_hf(hf, embed_dim))
    fresh = load_hf_weights(model, _read_safetensors(folder))
    model.fresh_heads = tuple(fresh)
    if fresh:
        logger.info("LXMERT heads not in %s, left freshly initialised: %s", folder, fresh)
    return model
