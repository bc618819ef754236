"""Checkpoints for `ViLBertModel` that we did not write: released ViLBERT and local BERTs.

Released facebookresearch/vilbert-multi-task state dicts (`VILBertForVLTasks` for
multi_task_model.bin, `BertForMultiModalPreTraining` for pretrained_model.bin) load by
renaming their keys to ours. The mapping drops exactly two kinds of released keys:

- `cls.predictions.decoder.weight`: the MLM decoder, tied to (the same tensor as)
  `bert.embeddings.word_embeddings.weight`; ours reads the word embeddings directly.
- `bert.encoder.c_layer.N.biOutput.q_dense1/q_dense2`: built by the released code but
  never used in its forward pass.

Any other key the mapping does not know is an error, so nothing is silently lost.
Released checkpoints are pickles (.bin): convert them to safetensors outside the
service (e.g. `safetensors.torch.save_file(torch.load(path, weights_only=True))`)
before loading; this module only reads safetensors.

A text stream initialises from any local BERT folder (config.json + model.safetensors
in transformers' BertModel / BertForPreTraining layout) with `init_text_from_bert`.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from service.models.vilbert import ViLBertConfig, ViLBertModel

RELEASED_MODELS = ("VILBertForVLTasks", "BertForMultiModalPreTraining")

# Our top-level modules that each released model holds (the rest keep their init).
PRETRAINING_MODULES = (
    "text_embeddings",
    "image_embeddings",
    "text_layers",
    "image_layers",
    "co_layers",
    "text_pooler",
    "image_pooler",
    "mlm_head",
    "region_head",
    "align_head",
)
TASK_MODULES = (
    "answer_head",
    "gqa_head",
    "pair_head",
    "retrieval_head",
    "entailment_head",
    "ground_head",
    "token_head",
)
RELEASED_MODULES = {
    "VILBertForVLTasks": PRETRAINING_MODULES + TASK_MODULES,
    "BertForMultiModalPreTraining": PRETRAINING_MODULES,
}

# released module path (prefix) -> ours; the longest matching prefix wins
_MODULES = {
    "bert.embeddings.word_embeddings": "text_embeddings.word",
    "bert.embeddings.position_embeddings": "text_embeddings.position",
    "bert.embeddings.token_type_embeddings": "text_embeddings.token_type",
    "bert.embeddings.task_embeddings": "text_embeddings.task",
    "bert.embeddings.LayerNorm": "text_embeddings.ln",
    "bert.v_embeddings.image_embeddings": "image_embeddings.feature",
    "bert.v_embeddings.image_location_embeddings": "image_embeddings.location",
    "bert.v_embeddings.LayerNorm": "image_embeddings.ln",
    "bert.t_pooler.dense": "text_pooler",
    "bert.v_pooler.dense": "image_pooler",
    "cls.predictions": "mlm_head",  # .bias
    "cls.predictions.transform.dense": "mlm_head.dense",
    "cls.predictions.transform.LayerNorm": "mlm_head.ln",
    "cls.imagePredictions.transform.dense": "region_head.dense",
    "cls.imagePredictions.transform.LayerNorm": "region_head.ln",
    "cls.imagePredictions.decoder": "region_head.decoder",
    "cls.bi_seq_relationship": "align_head",
    "vil_prediction.logit_fc": "answer_head.mlp",
    "vil_prediction_gqa.logit_fc": "gqa_head.mlp",
    "vil_binary_prediction.logit_fc": "pair_head.mlp",
    "vil_logit": "retrieval_head",
    "vil_tri_prediction": "entailment_head",
    "vision_logit": "ground_head",
    "linguisic_logit": "token_head",  # sic: the released spelling
}

# inside one BERT layer, text (bert.encoder.layer) or visual (bert.encoder.v_layer)
_LAYER = {
    "attention.self.query": "attn.query",
    "attention.self.key": "attn.key",
    "attention.self.value": "attn.value",
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "attn.ln",
    "intermediate.dense": "ffn.fc",
    "output.dense": "ffn.proj",
    "output.LayerNorm": "ffn.ln",
}

# inside one co-attention layer (bert.encoder.c_layer). The released BertBiAttention
# scores query2 (text) against key1 (image) and reads value1: the text side; its
# output goes through biOutput.dense2 / LayerNorm2. The image side is the mirror.
_CO_LAYER = {
    "biattention.query2": "text_cross.query",
    "biattention.key1": "text_cross.key",
    "biattention.value1": "text_cross.value",
    "biOutput.dense2": "text_cross.proj",
    "biOutput.LayerNorm2": "text_cross.ln",
    "biattention.query1": "image_cross.query",
    "biattention.key2": "image_cross.key",
    "biattention.value2": "image_cross.value",
    "biOutput.dense1": "image_cross.proj",
    "biOutput.LayerNorm1": "image_cross.ln",
    "t_intermediate.dense": "text_ffn.fc",
    "t_output.dense": "text_ffn.proj",
    "t_output.LayerNorm": "text_ffn.ln",
    "v_intermediate.dense": "image_ffn.fc",
    "v_output.dense": "image_ffn.proj",
    "v_output.LayerNorm": "image_ffn.ln",
}
_STACKS = {
    "layer": ("text_layers", _LAYER),
    "v_layer": ("image_layers", _LAYER),
    "c_layer": ("co_layers", _CO_LAYER),
}
_STACK_KEY = re.compile(r"bert\.encoder\.(layer|v_layer|c_layer)\.(\d+)\.(.+)")
_TIED_DECODER = "cls.predictions.decoder.weight"
_UNUSED = re.compile(r"bert\.encoder\.c_layer\.\d+\.biOutput\.q_dense[12]\.(weight|bias)")


def rename_released_key(key: str) -> str:
    """One released key -> ours, e.g. bert.encoder.c_layer.0.biattention.query2.weight
    -> co_layers.0.text_cross.query.weight. KeyError for a key we do not know."""
    module, param = key.rsplit(".", 1)
    m = _STACK_KEY.fullmatch(module)
    if m:
        stack, idx, inner = m.groups()
        ours, table = _STACKS[stack]
        if inner in table:
            return f"{ours}.{idx}.{table[inner]}.{param}"
    else:
        for prefix in sorted(_MODULES, key=len, reverse=True):
            if module == prefix or module.startswith(prefix + "."):
                return _MODULES[prefix] + module[len(prefix) :] + "." + param
    raise KeyError(f"no ViLBERT mapping for released key {key!r}")


def map_released_keys(state_dict: dict[str, Tensor], model_name: str) -> dict[str, Tensor]:
    """Rename a released state dict to our keys, dropping the tied decoder and q_dense.

    Raises on unknown keys and on keys the named released model does not have.
    """
    if model_name not in RELEASED_MODELS:
        raise ValueError(f"unknown released model {model_name!r}; expected {RELEASED_MODELS}")
    allowed = RELEASED_MODULES[model_name]
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DataParallel
    _check_tied(state_dict)
    mapped = {}
    for key, tensor in state_dict.items():
        if key == _TIED_DECODER or _UNUSED.fullmatch(key):
            continue
        ours = rename_released_key(key)
        if ours.split(".", 1)[0] not in allowed:
            raise KeyError(f"{key!r} is not part of {model_name}")
        mapped[ours] = tensor
    return mapped


def _check_tied(state_dict: dict[str, Tensor]) -> None:
    words = state_dict.get("bert.embeddings.word_embeddings.weight")
    decoder = state_dict.get(_TIED_DECODER)
    if words is None or decoder is None or words.is_meta or decoder.is_meta:
        return
    if words.shape != decoder.shape or not torch.equal(words, decoder):
        raise ValueError("cls.predictions.decoder.weight differs from the word embeddings")


def released_view(model: ViLBertModel, model_name: str) -> nn.ModuleDict:
    """The submodules of `model` that a released checkpoint holds, under our key names.

    Shares parameters with `model`: `released_view(m, name).load_state_dict(mapped,
    strict=True)` loads into `m` and fails on any missing, unexpected or misshapen key.
    """
    return nn.ModuleDict({name: getattr(model, name) for name in RELEASED_MODULES[model_name]})


def load_released(
    model: ViLBertModel, state_dict: dict[str, Tensor], model_name: str, assign: bool = False
) -> list[str]:
    """Load a released state dict strictly into `model`; returns our parameter names that
    it does not cover (they keep their init): `dual.*`, plus the task heads for
    BertForMultiModalPreTraining."""
    view = released_view(model, model_name)
    view.load_state_dict(map_released_keys(state_dict, model_name), strict=True, assign=assign)
    covered = set(view.state_dict())
    return [k for k in model.state_dict() if k not in covered]


# released config keys whose other values change the computation; we support these only
_RELEASED_SETTINGS = {
    "fusion_method": "mul",
    "pooling_method": "mul",
    "hidden_act": "gelu",
    "v_hidden_act": "gelu",
    "dynamic_attention": False,
    "with_coattention": True,
    "in_batch_pairs": False,
    "fast_mode": False,
    "model": "bert",
}


def config_from_released(
    json_config: dict[str, Any], overrides: dict[str, Any] | None = None
) -> ViLBertConfig:
    """ViLBertConfig from a released config JSON (e.g. bert_base_6layer_6conect.json)
    plus the command-line overrides the released scripts apply (task_specific_tokens,
    v_target_size). Keys that only steer training (objective, fixed_t_layer, ...) are
    ignored; keys that would change the forward pass must keep the values we implement."""
    merged = {**json_config, **(overrides or {})}
    for key, supported in _RELEASED_SETTINGS.items():
        if key in merged and merged[key] != supported:
            raise ValueError(f"released setting {key}={merged[key]!r} is not supported")
    ours = {f.name for f in fields(ViLBertConfig)}
    return ViLBertConfig(**{k: v for k, v in merged.items() if k in ours})


# ---- BERT folders -> the text stream ---------------------------------------------------

_BERT_WIDTHS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


def init_text_from_bert(model: ViLBertModel, folder: str | Path) -> list[str]:
    """Copy a local BERT checkpoint into the text stream; returns our keys it set.

    Loads the embeddings, the first `num_hidden_layers` layers, the MLM head if the
    checkpoint has one (BertForPreTraining layout), and the pooler's dense layer when its
    shape fits ours (BERT's pooler is tanh, ours ReLU, so this is only a starting point).
    Widths must equal the config's; a checkpoint with fewer layers is an error.
    """
    folder = Path(folder)
    bert = json.loads((folder / "config.json").read_text())
    _check_bert_config(model.config, bert)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: BERT weights load from safetensors only")
    ours = model.state_dict()
    mapped = {}
    for key, tensor in load_file(str(weights)).items():
        name = _rename_bert_key(key, model.config.num_hidden_layers)
        if name is None or (name.startswith("text_pooler.") and ours[name].shape != tensor.shape):
            continue
        mapped[name] = tensor
    required = [
        k for k in ours if k.startswith(("text_embeddings.", "text_layers.")) and ".task." not in k
    ]
    missing = [k for k in required if k not in mapped]
    if missing:
        raise ValueError(f"{folder} lacks text-stream weights, e.g. {missing[:3]}")
    model.load_state_dict(mapped, strict=False)
    return sorted(mapped)


def _check_bert_config(c: ViLBertConfig, bert: dict[str, Any]) -> None:
    for name in _BERT_WIDTHS:
        if bert.get(name) != getattr(c, name):
            raise ValueError(
                f"BERT {name}={bert.get(name)} but the ViLBERT config has {getattr(c, name)}"
            )
    if bert.get("num_hidden_layers", 0) < c.num_hidden_layers:
        raise ValueError(
            f"BERT has {bert.get('num_hidden_layers')} layers; the text stream needs "
            f"{c.num_hidden_layers}"
        )
    if bert.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"BERT hidden_act {bert['hidden_act']!r} is not gelu")
    if bert.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    if abs(bert.get("layer_norm_eps", 1e-12) - c.layer_norm_eps) > 1e-15:
        raise ValueError(f"BERT layer_norm_eps {bert['layer_norm_eps']} != {c.layer_norm_eps}")


def _rename_bert_key(key: str, n_layers: int) -> str | None:
    """A transformers BERT key -> ours, or None for what the text stream does not take."""
    key = key.removeprefix("bert.").replace(".gamma", ".weight").replace(".beta", ".bias")
    m = re.fullmatch(r"encoder\.layer\.(\d+)\..+", key)
    if m and int(m.group(1)) >= n_layers:
        return None
    if key.startswith("pooler.dense."):
        return "text_pooler." + key.rsplit(".", 1)[1]
    if key.startswith(("embeddings.", "encoder.layer.")):
        key = "bert." + key
    elif not key.startswith("cls.predictions.") or key == _TIED_DECODER:
        return None  # position_ids buffer, NSP head, tied decoder
    try:
        return rename_released_key(key)
    except KeyError:
        return None
