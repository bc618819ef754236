"""Every hostile or odd image gets a BadImage with a message, or decodes to correct RGB."""

import io

import pytest
from PIL import Image

from service.runtime.images import BadImage, decode_image

LIMIT = 1024 * 1024


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _red(size=(32, 24), mode="RGB") -> Image.Image:
    return Image.new(mode, size, (255, 0, 0) if mode == "RGB" else 0)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, not an image", "not an image"),
        (_bytes(_red(), "PNG")[:60], "corrupt or truncated"),
        (_bytes(_red((64, 64)), "JPEG")[:200], "truncated|corrupt|cannot be read"),
        (_bytes(_red(), "ICO"), "not supported"),
        (_bytes(_red((2048, 1024)), "PNG"), "pixels; the limit is"),
    ],
    ids=["empty", "text", "truncated-png", "truncated-jpeg", "ico", "too-many-pixels"],
)
def test_bad_images_rejected_with_reason(data, message):
    with pytest.raises(BadImage, match=message):
        decode_image(data, max_pixels=LIMIT)


def test_decompression_bomb_rejected_from_header():
    # A PNG header declaring 100k x 100k pixels: rejected before decoding.
    png = _bytes(_red((1, 1)), "PNG")
    ihdr = png.index(b"IHDR")
    bomb = bytearray(png)
    bomb[ihdr + 4 : ihdr + 12] = (100_000).to_bytes(4, "big") * 2
    with pytest.raises(BadImage):
        decode_image(bytes(bomb), max_pixels=LIMIT)


@pytest.mark.parametrize(
    "image, fmt",
    [
        (_red(), "PNG"),
        (_red(), "JPEG"),
        (_red(), "WEBP"),
        (_red(), "BMP"),
        (_red().convert("P"), "GIF"),
        (_red().convert("P"), "PNG"),
        (_red().convert("CMYK"), "JPEG"),
        (_red().convert("RGBA"), "PNG"),
        (_red((1, 1)), "PNG"),
    ],
    ids=["png", "jpeg", "webp", "bmp", "gif", "palette", "cmyk", "rgba", "1x1"],
)
def test_odd_but_valid_images_decode_to_rgb(image, fmt):
    decoded = decode_image(_bytes(image, fmt), max_pixels=LIMIT)
    assert decoded.image.mode == "RGB"
    assert decoded.size == image.size
    r, g, b = decoded.image.getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_grayscale_decodes():
    image = Image.new("I;16", (8, 8), 65535)
    decoded = decode_image(_bytes(image, "PNG"), max_pixels=LIMIT)
    assert decoded.image.getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buf.getvalue(), max_pixels=LIMIT)
    assert decoded.image.getpixel((0, 0))[0] > 200


def test_exif_rotation_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(_bytes(image, "JPEG", exif=exif), max_pixels=LIMIT)
    assert decoded.size == (20, 40)


def test_sha256_is_of_the_bytes():
    import hashlib

    data = _bytes(_red(), "PNG")
    assert decode_image(data, max_pixels=LIMIT).sha256 == hashlib.sha256(data).hexdigest()
