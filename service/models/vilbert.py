"""ViLBERT (Lu et al., NeurIPS 2019) in one file.

Two streams, one for text (BERT layers) and one for image regions (transformer
layers), joined by co-attentional layers in which each stream's queries attend to the
other stream's keys and values. The layer schedule, widths, heads and task heads follow
the released facebookresearch/vilbert-multi-task code, so its checkpoints load through
a key renaming (`service.models.vilbert_checkpoint`). The module names here are ours:

    text_embeddings, image_embeddings      bert.embeddings, bert.v_embeddings
    text_layers, image_layers, co_layers   bert.encoder.layer, .v_layer, .c_layer
    text_pooler, image_pooler              bert.t_pooler.dense, bert.v_pooler.dense
    mlm_head, region_head, align_head      cls.predictions, .imagePredictions, .bi_seq_relationship
    answer_head ... token_head             vil_prediction ... linguisic_logit (task heads)
    dual                                   ours: projections for single-modality embeddings

An image enters as its regions plus an IMG token placed first: the mean of the real
regions' features at location [0, 0, 1, 1, 1]. The model builds it from the `Batch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.models.backbone import (
    WORD_CHECK_PRIOR,
    Batch,
    masked_mean,
    once_per_distinct_row,
    word_checked,
)

MASK_VALUE = -10000.0  # added to attention scores of padded keys, as the released code does
IMG_LOCATION = (0.0, 0.0, 1.0, 1.0, 1.0)  # the IMG token covers the whole image


@dataclass
class ViLBertConfig:
    """Everything needed to rebuild a `ViLBertModel`; JSON-serialisable via `asdict`.

    Defaults equal the released `bert_base_6layer_6conect.json` (BERT-base text stream,
    6-layer 1024-wide visual stream, 6 co-attention layers after text layers 5..10).
    """

    # text stream (BERT)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    # visual stream
    v_feature_size: int = 2048
    v_hidden_size: int = 1024
    v_num_hidden_layers: int = 6
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 1024
    v_hidden_dropout_prob: float = 0.1
    v_attention_probs_dropout_prob: float = 0.1
    # co-attention: the k-th co-layer runs once the text stream has run t_biattention_id[k]
    # layers and the visual stream v_biattention_id[k] layers; empty lists = two
    # independent streams (co-attention off).
    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 8
    bi_intermediate_size: int = 1024  # kept for fidelity; unused, as in the released code
    t_biattention_id: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    v_biattention_id: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    # heads
    v_target_size: int = 1601  # masked-region classes (Visual Genome 1600 + background)
    num_answers: int = 3129  # VQA v2 answer vocabulary
    num_gqa_answers: int = 1533
    head_dropout_prob: float = 0.1
    # task tokens of the multi-task model: an embedding inserted after [CLS]
    task_specific_tokens: bool = False
    num_task_tokens: int = 20
    # task token per method (vilbert_tasks.yml: VQA 1, Flickr30k retrieval 8, RefCOCO+ 10)
    task_ids: dict[str, int] = field(
        default_factory=lambda: {"answer": 1, "match": 8, "ground": 10}
    )
    # ours: width of the single-modality embeddings for gallery search
    embed_dim: int = 256
    # ours: `match` also asks the per-token head (token_head) which words are false
    word_check: bool = False
    initializer_range: float = 0.02
    # ours: std of the box projection's initial weights (None: initializer_range, as
    # released). Region features are far larger than the 5-d box, so at the released
    # scale the box starts as ~2% of a region's embedding and fades through the layers
    # (docs/experiments/diagnosis/, section 10).
    box_init_std: float | None = None
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if len(self.t_biattention_id) != len(self.v_biattention_id):
            raise ValueError("t_biattention_id and v_biattention_id must have equal lengths")
        for name, ids, n in (
            ("t_biattention_id", self.t_biattention_id, self.num_hidden_layers),
            ("v_biattention_id", self.v_biattention_id, self.v_num_hidden_layers),
        ):
            if list(ids) != sorted(ids) or any(not 0 <= i <= n for i in ids):
                raise ValueError(f"{name} must be ascending layer counts in [0, {n}]: {ids}")
        for width, heads in (
            (self.hidden_size, self.num_attention_heads),
            (self.v_hidden_size, self.v_num_attention_heads),
            (self.bi_hidden_size, self.bi_num_attention_heads),
        ):
            if width % heads:
                raise ValueError(f"width {width} is not a multiple of {heads} heads")
        if self.box_init_std is not None and not self.box_init_std > 0:
            raise ValueError(f"box_init_std must be > 0, not {self.box_init_std}")


class Attention(nn.Module):
    """BERT's attention block: multi-head attention, projection, residual, LayerNorm.

    Self-attention when `context` is `x`; co-attention when the queries come from one
    stream and the keys and values from the other (widths may differ).
    """

    def __init__(self, q_dim, kv_dim, inner_dim, n_head, attn_dropout, dropout, eps):
        super().__init__()
        self.n_head = n_head
        self.attn_dropout = attn_dropout
        self.query = nn.Linear(q_dim, inner_dim)
        self.key = nn.Linear(kv_dim, inner_dim)
        self.value = nn.Linear(kv_dim, inner_dim)
        self.proj = nn.Linear(inner_dim, q_dim)
        self.ln = nn.LayerNorm(q_dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        # x (B, N, q_dim), context (B, M, kv_dim), context_mask (B, 1, 1, M) additive
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.query(x).view(b, n, self.n_head, -1).transpose(1, 2)  # (B, h, N, d)
        k = self.key(context).view(b, m, self.n_head, -1).transpose(1, 2)  # (B, h, M, d)
        v = self.value(context).view(b, m, self.n_head, -1).transpose(1, 2)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=context_mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, n, -1)  # (B, N, inner)
        return self.ln(x + self.dropout(self.proj(y)))


class FeedForward(nn.Module):
    """BERT's feed-forward block: Linear, GeLU, Linear, residual, LayerNorm."""

    def __init__(self, dim, hidden, dropout, eps):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x + self.dropout(self.proj(F.gelu(self.fc(x)))))


class TransformerLayer(nn.Module):
    """One BERT layer (used by both streams)."""

    def __init__(self, dim, n_head, ffn_dim, attn_dropout, dropout, eps):
        super().__init__()
        self.attn = Attention(dim, dim, dim, n_head, attn_dropout, dropout, eps)
        self.ffn = FeedForward(dim, ffn_dim, dropout, eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.ffn(self.attn(x, x, mask))


class CoAttentionLayer(nn.Module):
    """Co-attentional transformer layer: each stream attends to the other, then its own FFN.

    Both directions read this layer's inputs (not each other's outputs), in bi_hidden
    width with bi_num_attention_heads, as the released BertConnectionLayer.
    """

    def __init__(self, c: ViLBertConfig):
        super().__init__()
        t, v, bi, heads, eps = (
            c.hidden_size,
            c.v_hidden_size,
            c.bi_hidden_size,
            c.bi_num_attention_heads,
            c.layer_norm_eps,
        )
        # released dropout1 (v_attention_probs) acts on the text queries' attention
        self.text_cross = Attention(
            t, v, bi, heads, c.v_attention_probs_dropout_prob, c.hidden_dropout_prob, eps
        )
        self.image_cross = Attention(
            v, t, bi, heads, c.attention_probs_dropout_prob, c.v_hidden_dropout_prob, eps
        )
        self.text_ffn = FeedForward(t, c.intermediate_size, c.hidden_dropout_prob, eps)
        self.image_ffn = FeedForward(v, c.v_intermediate_size, c.v_hidden_dropout_prob, eps)

    def forward(self, t: Tensor, t_mask: Tensor, v: Tensor, v_mask: Tensor):
        t_new = self.text_cross(t, v, v_mask)  # text queries, image keys/values
        v_new = self.image_cross(v, t, t_mask)  # image queries, text keys/values
        return self.text_ffn(t_new), self.image_ffn(v_new)


class TextEmbeddings(nn.Module):
    """Word + position + token type embeddings, LayerNorm; optional task token after [CLS]."""

    def __init__(self, c: ViLBertConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        if c.task_specific_tokens:
            self.task = nn.Embedding(c.num_task_tokens, c.hidden_size)
        self.ln = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, task_id: int | None = None):
        # input_ids, token_type_ids (B, T) -> (B, T, H), or (B, T+1, H) with a task token
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)
        if task_id is not None:
            if not hasattr(self, "task"):
                raise ValueError("task_id given but the config has task_specific_tokens=False")
            task = self.task.weight[task_id].expand(x.shape[0], 1, -1)  # (B, 1, H), no position
            x = torch.cat([x[:, :1], task, x[:, 1:]], dim=1)
        return self.dropout(self.ln(x))


class ImageEmbeddings(nn.Module):
    """Linear(region feature) + Linear(5-d location), LayerNorm."""

    def __init__(self, c: ViLBertConfig):
        super().__init__()
        self.feature = nn.Linear(c.v_feature_size, c.v_hidden_size)
        self.location = nn.Linear(5, c.v_hidden_size)
        self.ln = nn.LayerNorm(c.v_hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, features: Tensor, locations: Tensor) -> Tensor:
        # features (B, R, F), locations (B, R, 5) -> (B, R, Hv)
        return self.dropout(self.ln(self.feature(features) + self.location(locations)))


class MaskedLMHead(nn.Module):
    """BERT's MLM head; the decoder is the word embedding matrix (tied), plus a bias."""

    def __init__(self, dim, vocab_size, eps):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.ln(F.gelu(self.dense(h))), word_embeddings, self.bias)


class RegionClassHead(nn.Module):
    """Masked-region class distribution (released `imagePredictions`)."""

    def __init__(self, dim, n_classes, eps):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, n_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(h))))


class Classifier(nn.Module):
    """Released SimpleClassifier: Linear, GeLU, LayerNorm, Linear (keys mlp.0/.2/.3)."""

    def __init__(self, in_dim, hidden, n_out, eps):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden, eps=eps),
            nn.Linear(hidden, n_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class DualEncoderHeads(nn.Module):
    """Ours, in no released checkpoint: project each stream's pooled output for search."""

    def __init__(self, c: ViLBertConfig):
        super().__init__()
        self.text_proj = nn.Linear(c.hidden_size, c.embed_dim)
        self.image_proj = nn.Linear(c.v_hidden_size, c.embed_dim)


def extended_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, N) 1 = real -> (B, 1, 1, N) additive: 0 for real keys, MASK_VALUE for padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


def region_locations(boxes: Tensor) -> Tensor:
    """Normalised boxes (B, R, 4) -> ViLBERT's 5-d locations (x1, y1, x2, y2, area)."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return torch.cat([boxes, area.unsqueeze(-1)], dim=-1)


def with_img_token(features: Tensor, boxes: Tensor, mask: Tensor):
    """Prepend the IMG token: mean of the real regions' features, location [0,0,1,1,1].

    Returns features (B, 1+R, F), locations (B, 1+R, 5), mask (B, 1+R).
    """
    b = features.shape[0]
    img = masked_mean(features, mask).unsqueeze(1)  # (B, 1, F)
    img_loc = features.new_tensor(IMG_LOCATION).expand(b, 1, 5)
    locs = torch.cat([img_loc, region_locations(boxes).to(features.dtype)], dim=1)
    mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)
    return torch.cat([img, features], dim=1), locs, mask


class ViLBertModel(nn.Module):
    """ViLBERT with every head of the released multi-task model, plus our dual heads.

    `forward` returns all head outputs (training, tests); the protocol methods
    `answer`, `match`, `ground`, `embed_text`, `embed_image` compute only what they need.
    """

    kind = "vilbert"

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        c = self.config = config
        eps = c.layer_norm_eps
        self.text_embeddings = TextEmbeddings(c)
        self.image_embeddings = ImageEmbeddings(c)
        self.text_layers = nn.ModuleList(
            TransformerLayer(
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size,
                c.attention_probs_dropout_prob,
                c.hidden_dropout_prob,
                eps,
            )
            for _ in range(c.num_hidden_layers)
        )
        self.image_layers = nn.ModuleList(
            TransformerLayer(
                c.v_hidden_size,
                c.v_num_attention_heads,
                c.v_intermediate_size,
                c.v_attention_probs_dropout_prob,
                c.v_hidden_dropout_prob,
                eps,
            )
            for _ in range(c.v_num_hidden_layers)
        )
        self.co_layers = nn.ModuleList(CoAttentionLayer(c) for _ in c.t_biattention_id)
        self.text_pooler = nn.Linear(c.hidden_size, c.bi_hidden_size)  # first token, ReLU
        self.image_pooler = nn.Linear(c.v_hidden_size, c.bi_hidden_size)  # IMG token, ReLU
        # pretraining heads
        self.mlm_head = MaskedLMHead(c.hidden_size, c.vocab_size, eps)
        self.region_head = RegionClassHead(c.v_hidden_size, c.v_target_size, eps)
        self.align_head = nn.Linear(c.bi_hidden_size, 2)  # index 0 = matched
        # task heads of the released multi-task model, all on the fused pooled vector
        bi = c.bi_hidden_size
        self.answer_head = Classifier(bi, 2 * bi, c.num_answers, eps)  # VQA
        self.gqa_head = Classifier(bi, 2 * bi, c.num_gqa_answers, eps)  # GQA
        self.pair_head = Classifier(2 * bi, 2 * bi, 2, eps)  # NLVR2: two images, one text
        self.retrieval_head = nn.Linear(bi, 1)  # vil_logit
        self.entailment_head = nn.Linear(bi, 3)  # SNLI-VE
        self.ground_head = nn.Linear(c.v_hidden_size, 1)  # per region (vision_logit)
        self.token_head = nn.Linear(c.hidden_size, 1)  # per token (linguisic_logit)
        self.dual = DualEncoderHeads(c)
        self.dropout = nn.Dropout(c.head_dropout_prob)
        self.apply(self._init_weights)
        if c.box_init_std is not None:
            nn.init.normal_(self.image_embeddings.location.weight, std=c.box_init_std)
        if c.word_check:
            nn.init.constant_(self.token_head.bias, WORD_CHECK_PRIOR)

    def _init_weights(self, module: nn.Module) -> None:
        # the released BertPreTrainedModel.init_weights
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---- encoders -------------------------------------------------------------------

    def _task(self, method: str) -> int | None:
        return self.config.task_ids[method] if self.config.task_specific_tokens else None

    def encode(self, batch: Batch, task_id: int | None = None) -> dict[str, Tensor]:
        """Both streams with co-attention.

        Returns sequence_output_t (B, T, H) aligned with input_ids (a task token, if any,
        is dropped), sequence_output_v (B, 1+R, Hv) with the IMG token at 0, and the
        pooled outputs pooled_t, pooled_v (B, bi_hidden). `task_id` inserts a task token
        (multi-task checkpoints); None inserts none.
        """
        t_mask = batch.attention_mask
        if task_id is not None:
            t_mask = torch.cat([t_mask.new_ones(len(batch), 1), t_mask], dim=1)
        text = (batch.input_ids, batch.token_type_ids, t_mask)
        prefix = partial(self._text_prefix, task_id=task_id)
        if self.training:
            t = prefix(*text)
        else:  # a caption against many images runs its text-only layers once
            t = once_per_distinct_row(prefix, *text)
        feats, locs, v_mask = with_img_token(
            batch.region_features, batch.region_boxes, batch.region_mask
        )
        v = self.image_embeddings(feats, locs)
        t, v = self._run_streams(
            t, extended_mask(t_mask, t.dtype), v, extended_mask(v_mask, v.dtype)
        )
        if task_id is not None:
            t = torch.cat([t[:, :1], t[:, 2:]], dim=1)
        return {
            "sequence_output_t": t,
            "sequence_output_v": v,
            "pooled_t": F.relu(self.text_pooler(t[:, 0])),
            "pooled_v": F.relu(self.image_pooler(v[:, 0])),
        }

    def _text_prefix(self, input_ids: Tensor, token_type_ids: Tensor, t_mask: Tensor, task_id):
        """Text embeddings and the text layers before the first co-layer, which read the
        text alone: (B, T, H) (T + 1 with a task token)."""
        t = self.text_embeddings(input_ids, token_type_ids, task_id)
        mask = extended_mask(t_mask, t.dtype)
        for layer in self.text_layers[: self._text_only_layers()]:
            t = layer(t, mask)
        return t

    def _text_only_layers(self) -> int:
        """Text layers before the first co-layer (all of them when there is none)."""
        ids = self.config.t_biattention_id
        return ids[0] if ids else len(self.text_layers)

    def _run_streams(self, t: Tensor, t_mask: Tensor, v: Tensor, v_mask: Tensor):
        """The released BertEncoder schedule: before the k-th co-layer the text stream has
        run t_biattention_id[k] layers and the visual stream v_biattention_id[k]. `t` has
        run the text-only layers already (`_text_prefix`)."""
        t_done, v_done = self._text_only_layers(), 0
        ids = zip(self.config.t_biattention_id, self.config.v_biattention_id, strict=True)
        for co_layer, (t_end, v_end) in zip(self.co_layers, ids, strict=True):
            for layer in self.text_layers[t_done:t_end]:
                t = layer(t, t_mask)
            for layer in self.image_layers[v_done:v_end]:
                v = layer(v, v_mask)
            t, v = co_layer(t, t_mask, v, v_mask)
            t_done, v_done = t_end, v_end
        for layer in self.text_layers[t_done:]:
            t = layer(t, t_mask)
        for layer in self.image_layers[v_done:]:
            v = layer(v, v_mask)
        return t, v

    def text_stream(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids=None):
        """All text layers with no co-attention: (B, T, H). A plain BERT encoder."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        t = self.text_embeddings(input_ids, token_type_ids)
        mask = extended_mask(attention_mask, t.dtype)
        for layer in self.text_layers:
            t = layer(t, mask)
        return t

    def image_stream(self, region_features: Tensor, region_boxes: Tensor, region_mask: Tensor):
        """All visual layers with no co-attention: (B, 1+R, Hv), IMG token at 0."""
        feats, locs, mask = with_img_token(region_features, region_boxes, region_mask)
        v = self.image_embeddings(feats, locs)
        ext = extended_mask(mask, v.dtype)
        for layer in self.image_layers:
            v = layer(v, ext)
        return v

    # ---- single-modality embeddings (gallery search, first stage) -------------------

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """L2-normalised (B, embed_dim): masked mean of `text_stream`, projected.

        Every text layer runs, none of the co-attention: with a BERT-initialised text
        stream this is that BERT's sentence encoder (mean pooling, as MiniLM-L6 was
        trained for) before any multimodal training.
        """
        t = self.text_stream(input_ids, attention_mask)
        return F.normalize(self.dual.text_proj(masked_mean(t, attention_mask)), dim=-1)

    def embed_image(self, region_features: Tensor, region_boxes: Tensor, region_mask: Tensor):
        """L2-normalised (B, embed_dim): masked mean of the real regions of `image_stream`.

        Every visual layer runs, none of the co-attention (the released schedule puts no
        visual layer before the first co-layer, so "layers before co-attention" would be
        the embedding alone).
        """
        v = self.image_stream(region_features, region_boxes, region_mask)[:, 1:]
        return F.normalize(self.dual.image_proj(masked_mean(v, region_mask)), dim=-1)

    # ---- heads ----------------------------------------------------------------------

    def fuse(self, enc: dict[str, Tensor]) -> Tensor:
        """h_CLS ⊙ h_IMG after the poolers (released fusion_method "mul"): (B, bi)."""
        return self.dropout(enc["pooled_t"] * enc["pooled_v"])

    def _ground_logits(self, enc: dict[str, Tensor], region_mask: Tensor) -> Tensor:
        logits = self.ground_head(self.dropout(enc["sequence_output_v"][:, 1:])).squeeze(-1)
        return logits.masked_fill(region_mask == 0, torch.finfo(logits.dtype).min)  # (B, R)

    def _pretrain_heads(self, enc: dict[str, Tensor], fused: Tensor) -> dict[str, Tensor]:
        return {
            "mlm_logits": self.mlm_head(enc["sequence_output_t"], self.text_embeddings.word.weight),
            "region_logits": self.region_head(enc["sequence_output_v"][:, 1:]),
            "align_logits": self.align_head(fused),
        }

    def pretrain_outputs(self, batch: Batch, task_id: int | None = None) -> dict[str, Tensor]:
        """mlm_logits (B, T, V), region_logits (B, R, v_target_size) for the regions
        (IMG token excluded; padded rows are computed, the loss masks them),
        align_logits (B, 2) with index 0 = "matched"."""
        enc = self.encode(batch, task_id)
        return self._pretrain_heads(enc, self.fuse(enc))

    def forward(self, batch: Batch, task_id: int | None = None) -> dict[str, Tensor]:
        """Every per-item head: the pretraining outputs plus answer_logits (B, A),
        gqa_logits, retrieval_logits (B,), entailment_logits (B, 3), ground_logits (B, R)
        and token_logits (B, T). The two-image NLVR2 head is `pair_logits`."""
        enc = self.encode(batch, task_id)
        fused = self.fuse(enc)
        out = self._pretrain_heads(enc, fused)
        out["answer_logits"] = self.answer_head(fused)
        out["gqa_logits"] = self.gqa_head(fused)
        out["retrieval_logits"] = self.retrieval_head(fused).squeeze(-1)
        out["entailment_logits"] = self.entailment_head(fused)
        out["ground_logits"] = self._ground_logits(enc, batch.region_mask)
        out["token_logits"] = self.token_head(self.dropout(enc["sequence_output_t"])).squeeze(-1)
        return out

    def pair_logits(self, batch: Batch, task_id: int | None = None) -> Tensor:
        """NLVR2 head: items 2i and 2i+1 are one text with two images -> (B/2, 2)."""
        if len(batch) % 2:
            raise ValueError("pair_logits needs an even batch: (text, image 1), (text, image 2)")
        fused = self.fuse(self.encode(batch, task_id))
        return self.pair_head(fused.reshape(len(batch) // 2, -1))

    # ---- the VisionLanguageModel protocol -------------------------------------------

    def answer(self, batch: Batch) -> Tensor:
        """VQA logits (B, num_answers) from the fused pooled vector."""
        return self.answer_head(self.fuse(self.encode(batch, self._task("answer"))))

    def match(self, batch: Batch) -> Tensor:
        """Alignment logit (B,): log-odds that the text describes the image.

        From the pretraining alignment head, whose index 0 is "matched" (the released
        data loaders label a true caption 0 and a random one 1); with a word check, also
        that no word of the text is false (`backbone.word_checked`).
        """
        return word_checked(*self.match_words(batch), batch.attention_mask)

    def match_words(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """(alignment logit (B,), word-check logits (B, T) from `token_head`, or None
        when the config has no word check): see `match`."""
        enc = self.encode(batch, self._task("match"))
        scores = self.align_head(self.fuse(enc))
        words = None
        if self.config.word_check:
            words = self.token_head(self.dropout(enc["sequence_output_t"])).squeeze(-1)
        return scores[:, 0] - scores[:, 1], words

    def ground(self, batch: Batch) -> Tensor:
        """Per-region logits (B, R) for the R regions (IMG token excluded).

        Padded regions hold the dtype's most negative finite value (not -inf): a softmax
        over a row gives them zero weight, and a row with no real region stays finite.
        """
        enc = self.encode(batch, self._task("ground"))
        return self._ground_logits(enc, batch.region_mask)
