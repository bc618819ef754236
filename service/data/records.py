"""The annotation format of every data set we train on: one JSON object per line.

A data directory holds `<split>.jsonl` and the images it names (paths relative to the
directory). One record per image:

    {"id": "train_000001",
     "image": "images/train_000001.png",
     "width": 128, "height": 128,
     "source": "shapes",                      # or "easy-vqa"
     "objects": [{"box": [x1, y1, x2, y2],     # pixels, ends exclusive
                  "shape": "circle", "color": "red", "size": "small"}],
     "captions": ["..."],                     # may be empty (easy-VQA)
     "questions": [{"question": "...", "answer": "...", "family": "color"}],
     "refexps": [{"expression": "the small red circle", "index": 0}]}   # may be empty

`index` points into `objects`; `family` is one of language.FAMILIES and `answer` one of
language.ANSWERS. In shapes-world records the first caption names every object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image


def write_records(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records as JSON Lines via a temporary file and a rename (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def load_records(data_dir: str | Path, split: str) -> list[dict]:
    """All records of data_dir/<split>.jsonl, in file order."""
    path = Path(data_dir) / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_image(data_dir: str | Path, record: dict) -> Image.Image:
    """The record's image as RGB."""
    with Image.open(Path(data_dir) / record["image"]) as im:
        return im.convert("RGB")
