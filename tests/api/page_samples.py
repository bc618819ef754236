"""The demo page's sample images: shapes-world test scenes with 2 to 4 objects.

`python -m tests.api.page_samples` rewrites service/static/samples/ from the recipe below;
test_page checks that the shipped files are exactly what the recipe makes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from service.data import shapes

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "service" / "static" / "samples"
RECIPE = {"split": "test", "seed": 0, "size": 128, "count": 6, "min_objects": 2, "max_objects": 4}


def build_samples(recipe: dict = RECIPE) -> dict[str, bytes]:
    """File name -> bytes: one PNG per sample and index.json describing them all."""
    files: dict[str, bytes] = {}
    samples = []
    index = 0
    while len(samples) < recipe["count"]:
        rng = shapes.split_rng(recipe["seed"], recipe["split"], index)
        scene = shapes.generate_scene(rng, size=recipe["size"])
        if recipe["min_objects"] <= len(scene.objects) <= recipe["max_objects"]:
            sample_id = f"{recipe['split']}-{index:06d}"
            buf = io.BytesIO()
            shapes.render(scene, rng).save(buf, format="PNG", optimize=True)
            files[f"{sample_id}.png"] = buf.getvalue()
            record = shapes.scene_record(scene, rng, f"{sample_id}.png", sample_id)
            samples.append(
                {
                    "id": sample_id,
                    "file": record["image"],
                    "index": index,
                    "width": record["width"],
                    "height": record["height"],
                    "objects": record["objects"],
                    "captions": record["captions"],
                    "questions": [
                        {"question": q["question"], "answer": q["answer"]}
                        for q in record["questions"]
                    ],
                    "refexps": [r["expression"] for r in record["refexps"]],
                }
            )
        index += 1
    index_doc = {"generator": "service.data.shapes", "recipe": recipe, "samples": samples}
    files["index.json"] = (json.dumps(index_doc, indent=1) + "\n").encode()
    return files


def write_samples(out_dir: Path = SAMPLES_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in build_samples().items():
        (out_dir / name).write_bytes(data)


if __name__ == "__main__":
    write_samples()
    print(f"wrote {RECIPE['count']} samples to {SAMPLES_DIR}")
