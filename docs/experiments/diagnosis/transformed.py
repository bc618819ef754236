"""Fine-tuning from a store entry changed on load: the shared part of `reset_text.py`,
`scale_location.py` and `grow_cross.py`, which each change the model before training
(`finetune._init_model` wrapped) and write a new entry into a scratch store.
"""

from collections.abc import Callable

import torch
from torch import nn

import service.training.finetune as finetune

# the ViLBERT continuations of sections 3, 9 and 10: task "all", easy-VQA joining
VILBERT_CONTINUATION = dict(task="all", steps=5000, batch_size=64, lr=1e-4, include_easyvqa=True)


def finetune_transformed(transform: Callable[[nn.Module], nn.Module], **run_finetune_args):
    """`finetune.run_finetune(**run_finetune_args)` on `transform(model)`, the model its
    init entry loads as; 2 threads; prints the entry written."""
    load_entry = finetune._init_model

    def transformed(*args, **kwargs):
        model, manifest = load_entry(*args, **kwargs)
        return transform(model), manifest

    finetune._init_model = transformed
    torch.set_num_threads(2)
    entry = finetune.run_finetune(**run_finetune_args)
    print("wrote", entry.ref)
