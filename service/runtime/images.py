"""Decode and check a client's image bytes before anything else touches them.

Every way an image can be bad ends in `BadImage` with a message a user can act on:
not an image, a format we don't read, truncated data, zero size, or more pixels than
the limit (checked from the header, before the pixels are decoded, so a
decompression bomb costs nothing).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"})


class BadImage(ValueError):
    """The bytes are not an image this service can read; the message says why."""


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    sha256: str  # of the bytes as sent: the feature-cache key

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Bytes -> RGB image, or BadImage. The first frame of an animation is used."""
    if not data:
        raise BadImage("the image is empty (0 bytes)")
    image = _open(data)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadImage(f"the image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise BadImage(
            f"the image has {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    rgb = _load_rgb(image)
    return DecodedImage(image=rgb, sha256=hashlib.sha256(data).hexdigest())


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("the image declares more pixels than any limit allows") from None
    except UnidentifiedImageError:
        raise BadImage("the data is not an image in a supported format") from None
    except Exception as exc:  # PIL raises many kinds on hostile headers
        raise BadImage(f"the image header cannot be read (corrupt or truncated): {exc}") from None
    if image.format not in ALLOWED_FORMATS:
        allowed = ", ".join(sorted(ALLOWED_FORMATS))
        raise BadImage(f"image format {image.format} is not supported; use one of {allowed}")
    return image


def _load_rgb(image: Image.Image) -> Image.Image:
    """Decode pixels, apply EXIF rotation, convert any mode (16-bit, P, CMYK, LA) to RGB."""
    try:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda v: v / 256).convert("L")
        if image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        ):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")
    except BadImage:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"the image data is corrupt or truncated: {exc}") from None
