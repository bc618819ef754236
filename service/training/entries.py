"""Writing a trained backbone into the model store: one way for every training command."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
from torch import nn

from service.data.tokenizer import load_tokenizer
from service.store import Manifest, ModelStore


def write_model_entry(
    store: ModelStore, name: str, model: nn.Module, history: list, **meta
) -> Manifest:
    """Rank 0 writes the entry (weights, tokenizer files, history.json); others read it."""
    distributed = dist.is_available() and dist.is_initialized()
    ref = [None]
    if not distributed or dist.get_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            load_tokenizer().save_pretrained(tmp)
            tok_files = {p.name: p for p in Path(tmp).iterdir() if p.is_file()}
            manifest = store.write(
                name,
                model.kind,
                {"model.safetensors": model.state_dict()},
                config=asdict(model.config),
                extra_files={**tok_files, "history.json": json.dumps(history).encode()},
                tokenizer=sorted(tok_files),
                **meta,
            )
        ref = [manifest.ref]
    if distributed:
        dist.broadcast_object_list(ref, src=0)
    return store.resolve(ref[0])
