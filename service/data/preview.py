"""A grid of annotated images to show a person what a data set holds.

Each cell: the image upscaled, every box outlined with its label ("small red circle"),
and under it one question with its answer.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from service.data.records import load_image, load_records

SCALE = 2  # image upscaling
PAD = 8  # pixels around each image
LABEL_FONT = 11
TEXT_FONT = 13
TEXT_LINES = 4  # question (wrapped) + answer
LINE_HEIGHT = TEXT_FONT + 4
BOX_COLOR = (255, 0, 255)  # magenta: in no scene's palette


def cell_size(width: int, height: int) -> tuple[int, int]:
    """(w, h) of one grid cell for images of width x height."""
    return SCALE * width + 2 * PAD, SCALE * height + 2 * PAD + TEXT_LINES * LINE_HEIGHT


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def _label(obj: dict) -> str:
    return " ".join(str(obj[k]) for k in ("size", "color", "shape") if obj.get(k))


def _draw_cell(image: Image.Image, record: dict, cell: tuple[int, int], fonts) -> Image.Image:
    label_font, text_font = fonts
    out = Image.new("RGB", cell, (255, 255, 255))
    big = image.resize((image.width * SCALE, image.height * SCALE), Image.Resampling.NEAREST)
    out.paste(big, (PAD, PAD))
    draw = ImageDraw.Draw(out)
    for obj in record.get("objects", []):
        x1, y1, x2, y2 = (PAD + SCALE * v for v in obj["box"])
        draw.rectangle((x1 - 1, y1 - 1, x2, y2), outline=BOX_COLOR, width=2)
        text = _label(obj)
        if text:
            text_w = draw.textlength(text, font=label_font)
            tx, ty = max(1, min(x1, cell[0] - text_w - 2)), max(0, y1 - LABEL_FONT - 3)
            left, top, right, bottom = draw.textbbox((tx, ty), text, font=label_font)
            draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(255, 255, 255))
            draw.text((tx, ty), text, fill=(0, 0, 0), font=label_font)
    y = PAD + big.height + 4
    questions = record.get("questions") or [{"question": "(no question)", "answer": "-"}]
    q = questions[0]
    lines = _wrap(draw, q["question"], text_font, cell[0] - 2 * PAD)[: TEXT_LINES - 1]
    for line in lines:
        draw.text((PAD, y), line, fill=(0, 0, 0), font=text_font)
        y += LINE_HEIGHT
    draw.text((PAD, y), f"-> {q['answer']}", fill=(0, 90, 200), font=text_font)
    return out


def draw_preview(
    data_dir: str | Path, out_path: str | Path, split: str = "train", n: int = 16, cols: int = 4
) -> Path:
    """Save a grid of the first `n` images of a split, with boxes, labels and one question."""
    records = load_records(data_dir, split)[:n]
    if not records:
        raise ValueError(f"no records in {data_dir}/{split}.jsonl")
    width = max(r["width"] for r in records)
    height = max(r["height"] for r in records)
    cell = cell_size(width, height)
    rows = -(-len(records) // cols)
    cols = min(cols, len(records))
    grid = Image.new("RGB", (cols * cell[0], rows * cell[1]), (255, 255, 255))
    fonts = (ImageFont.load_default(size=LABEL_FONT), ImageFont.load_default(size=TEXT_FONT))
    for k, record in enumerate(records):
        tile = _draw_cell(load_image(data_dir, record), record, cell, fonts)
        grid.paste(tile, ((k % cols) * cell[0], (k // cols) * cell[1]))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_path)
    return out_path
