"""The preview grid: size, the images in it, their boxes and their question."""

from __future__ import annotations

import numpy as np
from PIL import Image

from service.data.preview import BOX_COLOR, PAD, SCALE, cell_size, draw_preview
from service.data.records import load_image, load_records
from service.data.shapes import write_split


def test_preview_grid_shows_images_boxes_and_questions(tmp_path):
    write_split(tmp_path, "train", 6, size=96, seed=0, progress=False)
    out = draw_preview(tmp_path, tmp_path / "grid" / "preview.png", n=6, cols=4)
    grid = np.asarray(Image.open(out).convert("RGB"))

    cw, ch = cell_size(96, 96)
    assert SCALE >= 2 and cw == SCALE * 96 + 2 * PAD and ch > cw  # room for text below
    assert grid.shape == (2 * ch, 4 * cw, 3)  # 6 images in 4 columns -> 2 rows

    records = load_records(tmp_path, "train")
    for k, record in enumerate(records):
        cell = grid[(k // 4) * ch : (k // 4 + 1) * ch, (k % 4) * cw : (k % 4 + 1) * cw]
        image = np.asarray(load_image(tmp_path, record))
        # Every object's centre pixel appears, upscaled, at its place in the cell.
        for obj in record["objects"]:
            x1, y1, x2, y2 = obj["box"]
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            if obj["shape"] != "triangle":  # a triangle's centre may be background
                got = cell[PAD + SCALE * cy, PAD + SCALE * cx]
                assert tuple(got) == tuple(image[cy, cx])
        assert (cell == BOX_COLOR).all(-1).sum() > 0  # boxes are drawn
        text_area = cell[ch - 60 :]
        assert (text_area.sum(-1) < 200).sum() > 50  # dark text under the image
    assert (grid[ch:, 2 * cw :] == 255).all()  # the two unused cells stay blank


def test_preview_with_fewer_images_than_asked(tmp_path):
    write_split(tmp_path, "val", 3, size=64, seed=1, progress=False)
    out = draw_preview(tmp_path, tmp_path / "p.png", split="val", n=16, cols=4)
    cw, ch = cell_size(64, 64)
    assert Image.open(out).size == (3 * cw, ch)
