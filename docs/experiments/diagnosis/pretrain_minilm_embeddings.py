"""LXMERT pretraining (`run_pretrain`, as `vqa train pretrain --backbone lxmert`) with its word
and position embeddings initialised from the packaged MiniLM's, projected onto their top
principal directions (384 -> hidden size). The baseline is the same call without this file:

    vqa train pretrain --backbone lxmert --batch-size 64 --lr 5e-4 --steps 3000 \
        --max-seconds 720 --store STORE --features FEATURES --data DATA --name pre-lxmert
    python docs/experiments/diagnosis/pretrain_minilm_embeddings.py STORE FEATURES DATA
"""

import sys

import torch
from safetensors.torch import load_file

import service.training.pretrain as pretrain
from service.data.tokenizer import minilm_dir

store, features, data = sys.argv[1:4]


def minilm_embeddings(model, kind, init_text):
    weights = load_file(str(minilm_dir() / "model.safetensors"))
    words = weights["embeddings.word_embeddings.weight"].float()  # (V, 384)
    positions = weights["embeddings.position_embeddings.weight"].float()  # (512, 384)
    emb = model.lxmert.embeddings
    hidden, n_pos = emb.word_embeddings.weight.shape[1], emb.position_embeddings.weight.shape[0]
    both = torch.cat([words, positions])
    mean = both.mean(0)
    top = torch.linalg.svd(both - mean, full_matrices=False).Vh[:hidden].T  # (384, hidden)
    with torch.no_grad():
        emb.word_embeddings.weight.copy_((words - mean) @ top)
        pos = positions[:n_pos]
        emb.position_embeddings.weight.copy_((pos - pos.mean(0)) @ top)
    return None  # no text folder to record


pretrain._init_text = minilm_embeddings
pretrain.run_pretrain(
    "lxmert",
    features,
    data,
    store,
    detector_ref="shapes-detector@1",
    out_name="pre-minilm-embeddings",
    steps=3000,
    batch_size=64,
    lr=5e-4,
    max_seconds=720,
    seed=0,
)
