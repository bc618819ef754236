"""The shapes world: seeded synthetic scenes of coloured circles, rectangles and triangles.

It plays, for us, the role COCO and Visual Genome play for the papers. A `Scene` is pure
annotation (boxes, shape, colour, size); `render` turns it into pixels. Every object is
drawn from `shape_mask`, whose mask fills its box exactly, so the stored box is tight on
the drawn pixels; objects keep a gap of background between them (their boxes may still
overlap a little, IoU <= 0.1), so no object ever hides another.

Boxes are (x1, y1, x2, y2) in pixels with exclusive ends: the object covers columns
x1..x2-1 and rows y1..y2-1, so x2 - x1 is its width and x1/W .. x2/W its normalised span.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("circle", "rectangle", "triangle")
# easy-VQA's palette, so its 13 answers are a subset of ours.
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}
SIZES = ("small", "large")
# Longer box side as a fraction of the canvas's shorter side, inclusive.
SIZE_RANGES = {"small": (0.12, 0.20), "large": (0.28, 0.40)}
MAX_OBJECTS = 6
MAX_IOU = 0.1
BACKGROUND_RANGE = (225, 255)  # each channel of the pastel background, inclusive
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ShapeObject:
    shape: str  # one of SHAPES
    color: str  # a key of COLORS
    size: str  # one of SIZES
    box: Box  # x1, y1, x2, y2 pixels, ends exclusive


@dataclass
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    objects: list[ShapeObject] = field(default_factory=list)
    noise: float = 0.0  # std of per-pixel Gaussian noise, as a fraction of 255


def size_class(box: Box, width: int, height: int) -> str | None:
    """'small' or 'large' by the longer box side, None when it falls in neither range."""
    longer = max(box[2] - box[0], box[3] - box[1]) / min(width, height)
    for name, (lo, hi) in SIZE_RANGES.items():
        if lo <= longer <= hi:
            return name
    return None


def box_iou(a: Box, b: Box) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """(h, w) bool mask of `shape` filling a w x h box; every border row and column is hit.

    A pixel is in when its centre lies inside the shape (circle: the inscribed ellipse;
    triangle: apex up at the top centre, base on the bottom row), with half a pixel of
    slack across for the triangle so its one- or two-pixel apex row is drawn.
    """
    if shape == "rectangle":
        return np.ones((h, w), dtype=bool)
    ys = (np.arange(h) + 0.5)[:, None]  # pixel centres
    xs = (np.arange(w) + 0.5)[None, :]
    if shape == "circle":
        return ((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2 <= 1.0
    if shape == "triangle":
        return np.abs(xs - w / 2) <= (w / 2) * (ys / h) + 0.5
    raise ValueError(f"unknown shape {shape!r}")


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1) square, for the gap kept between objects."""
    h, w = mask.shape
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _sample_dims(rng: np.random.Generator, shape: str, size: str, canvas: int) -> tuple[int, int]:
    """Box width and height whose longer side falls inside the size class's range."""
    lo, hi = SIZE_RANGES[size]
    longer = int(rng.integers(math.ceil(lo * canvas), math.floor(hi * canvas) + 1))
    if shape == "circle":
        return longer, longer
    ratio = rng.uniform(0.45, 0.85) if shape == "rectangle" else rng.uniform(0.75, 1.0)
    shorter = max(2, round(longer * ratio))
    return (longer, shorter) if rng.random() < 0.5 else (shorter, longer)


def _try_place(
    rng: np.random.Generator,
    canvas: int,
    kind: tuple[str, str, str],
    placed: list[ShapeObject],
    occupied: np.ndarray,
) -> ShapeObject | None:
    """An object of `kind` (shape, colour, size) at a random spot clear of the others."""
    shape, color, size = kind
    w, h = _sample_dims(rng, shape, size, canvas)
    margin = max(1, round(0.03 * canvas))
    if w > canvas - 2 * margin or h > canvas - 2 * margin:
        return None
    x1 = int(rng.integers(margin, canvas - margin - w + 1))
    y1 = int(rng.integers(margin, canvas - margin - h + 1))
    box = (x1, y1, x1 + w, y1 + h)
    if any(box_iou(box, o.box) > MAX_IOU for o in placed):
        return None
    if (occupied[y1 : y1 + h, x1 : x1 + w] & shape_mask(shape, w, h)).any():
        return None
    return ShapeObject(shape, color, size, box)


def _random_kind(rng: np.random.Generator) -> tuple[str, str, str]:
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    return shape, color, SIZES[rng.integers(len(SIZES))]


def _has_strict_relation(objects: list[ShapeObject]) -> bool:
    """True when some pair is strictly separated along x or y (captions need one)."""
    for a in objects:
        for b in objects:
            if a.box[2] < b.box[0] or a.box[3] < b.box[1]:
                return True
    return False


def generate_scene(rng: np.random.Generator, size: int = 128, noise: float = 0.0) -> Scene:
    """A random scene of 1..6 objects on a pastel background; deterministic given `rng`."""
    if size < 32:
        raise ValueError(f"canvas size must be at least 32 pixels, got {size}")
    background = tuple(int(v) for v in rng.integers(BACKGROUND_RANGE[0], 256, 3))
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    gap = max(1, size // 64)  # background pixels kept between any two objects
    while True:
        objects: list[ShapeObject] = []
        occupied = np.zeros((size, size), dtype=bool)  # dilated masks of placed objects
        # Kinds are drawn first and kept while placing, so crowded scenes do not favour
        # small objects; a scene that does not fit is redrawn whole.
        for kind in [_random_kind(rng) for _ in range(n)]:
            for _attempt in range(100):
                obj = _try_place(rng, size, kind, objects, occupied)
                if obj is not None:
                    break
            if obj is None:
                break
            objects.append(obj)
            x1, y1, x2, y2 = obj.box
            mask = np.zeros((size, size), dtype=bool)
            mask[y1:y2, x1:x2] = shape_mask(obj.shape, x2 - x1, y2 - y1)
            occupied |= _dilate(mask, gap)
        if len(objects) == n and (n == 1 or _has_strict_relation(objects)):
            return Scene(size, size, background, objects, noise)


def scene_from_objects(
    objects: list[ShapeObject | dict],
    size: int | tuple[int, int] = 128,
    background: tuple[int, int, int] = (240, 240, 240),
    noise: float = 0.0,
) -> Scene:
    """A scene with exactly the given objects (for tests and hard negatives).

    Objects are ShapeObjects or record dicts with box, shape, colour and optionally size
    (derived from the box when missing). Nothing is checked beyond vocabulary and canvas:
    overlap and relations are the caller's business.
    """
    width, height = (size, size) if isinstance(size, int) else size
    out = []
    for o in objects:
        if isinstance(o, dict):
            box = tuple(int(v) for v in o["box"])
            o = ShapeObject(o["shape"], o["color"], o.get("size") or "", box)
        if o.shape not in SHAPES or o.color not in COLORS:
            raise ValueError(f"unknown shape or colour in {o}")
        x1, y1, x2, y2 = o.box
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise ValueError(f"box {o.box} outside the {width}x{height} canvas")
        size_name = o.size or size_class(o.box, width, height)
        if size_name not in SIZES:
            raise ValueError(f"box {o.box} is neither small nor large; pass size")
        out.append(ShapeObject(o.shape, o.color, size_name, o.box))
    return Scene(width, height, tuple(background), out, noise)


def render(scene: Scene, rng: np.random.Generator | None = None) -> Image.Image:
    """RGB image of the scene; `rng` draws the noise (seed 0 when None and noise > 0)."""
    pixels = np.empty((scene.height, scene.width, 3), dtype=np.uint8)
    pixels[:] = scene.background
    for o in scene.objects:
        x1, y1, x2, y2 = o.box
        mask = shape_mask(o.shape, x2 - x1, y2 - y1)
        pixels[y1:y2, x1:x2][mask] = COLORS[o.color]
    if scene.noise > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        noisy = pixels + rng.normal(0.0, scene.noise * 255, pixels.shape)
        pixels = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def scene_record(
    scene: Scene, rng: np.random.Generator, image_rel_path: str, record_id: str
) -> dict:
    """The JSON Lines record of a scene (format in `service.data.records`)."""
    from service.data import language  # language imports this module's vocabulary

    return {
        "id": record_id,
        "image": image_rel_path,
        "width": scene.width,
        "height": scene.height,
        "source": "shapes",
        "objects": [
            {"box": list(o.box), "shape": o.shape, "color": o.color, "size": o.size}
            for o in scene.objects
        ],
        "captions": language.captions(scene, rng),
        "questions": language.questions(scene, rng),
        "refexps": language.refexps(scene, rng),
    }


def split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image `index` of `split`: any image is reproducible on its own."""
    return np.random.default_rng([seed, SPLIT_SEEDS[split], index])


def write_split(
    out_dir: str | Path,
    split: str,
    n: int,
    size: int = 128,
    seed: int = 0,
    noise: float = 0.0,
    progress: bool = True,
) -> Path:
    """Write out_dir/images/<split>_<i>.png and out_dir/<split>.jsonl; returns the .jsonl.

    The annotations file is written last, via a temporary file and a rename, so a crash
    never leaves a half-written one.
    """
    from tqdm import tqdm

    from service.data.records import write_records

    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in tqdm(range(n), desc=f"shapes {split}", disable=not progress, unit="img"):
        rng = split_rng(seed, split, i)
        scene = generate_scene(rng, size=size, noise=noise)
        rel = f"images/{split}_{i:06d}.png"
        render(scene, rng).save(out_dir / rel)
        records.append(scene_record(scene, rng, rel, f"{split}_{i:06d}"))
    path = out_dir / f"{split}.jsonl"
    write_records(path, records)
    return path
