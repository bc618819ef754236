"""Writing a trained backbone into the model store: one way for every training command."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from service.data.tokenizer import load_tokenizer
from service.store import WEIGHTS, Manifest, ModelStore


def freeze_external(model: nn.Module, external: dict[str, dict[str, str]]) -> None:
    """Freeze the parameters `external` names and remember them on the model, so that
    `write_model_entry` stores a reference to the installed package instead of the tensor."""
    params = dict(model.named_parameters())
    for name in external:
        params[name].requires_grad_(False)
    model.external_tensors = dict(external)


def stored_state(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The tensors an entry stores: floating ones in `dtype`, external ones left out."""
    external = getattr(model, "external_tensors", {})
    return {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
        if k not in external
    }


def write_model_entry(
    store: ModelStore, name: str, model: nn.Module, history: list, **meta
) -> Manifest:
    """Rank 0 writes the entry (weights in float16, tokenizer files, history.json); others
    read it. Parameters frozen by `freeze_external` are referenced, not stored."""
    distributed = dist.is_available() and dist.is_initialized()
    ref = [None]
    if not distributed or dist.get_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            load_tokenizer().save_pretrained(tmp)
            tok_files = {p.name: p for p in Path(tmp).iterdir() if p.is_file()}
            manifest = store.write(
                name,
                model.kind,
                {WEIGHTS: stored_state(model)},
                config=asdict(model.config),
                extra_files={**tok_files, "history.json": json.dumps(history).encode()},
                tokenizer=sorted(tok_files),
                external=getattr(model, "external_tensors", {}),
                **meta,
            )
        ref = [manifest.ref]
    if distributed:
        dist.broadcast_object_list(ref, src=0)
    return store.resolve(ref[0])
