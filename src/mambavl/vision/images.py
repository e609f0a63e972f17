"""Turning what users pass as an image (a PIL image, a path, raw bytes) into an RGB PIL image, safely:
EXIF rotation applied, every PIL mode converted deliberately, a pixel limit checked before decoding."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # ~8k × 8k; raise it explicitly for larger images
# What PIL raises for a file that is not what it claims, while opening or decoding: truncated data
# (OSError, EOFError, struct.error, zlib.error), a bad header (SyntaxError), a text chunk that
# decompresses past PngImagePlugin.MAX_TEXT_CHUNK (ValueError), ...
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class ImageError(ValueError):
    """An input that is not a usable image; the message says what and how to fix it."""


def load_image(image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from a PIL image, a path (str / Path) or the bytes of an image file.

    Modes: RGB as is; RGBA / LA / P with transparency composited on white (as a viewer shows them);
    16-bit and 32-bit grey (I;16, I, F) scaled to 8 bits by their value range; L, CMYK, YCbCr, ...
    by PIL's conversion. EXIF orientation is applied. Images over `max_pixels` are refused before
    their pixels are decoded (no decompression bomb).
    """
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, bytes | bytearray | memoryview):
        img = _open(io.BytesIO(bytes(image)), "the given bytes")
    elif isinstance(image, str | Path):
        path = Path(image).expanduser()
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        img = _open(path, str(path))
    else:
        raise ImageError(f"expected a PIL image, a path or image bytes, got {type(image).__name__}")
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"image of size {width}×{height} is empty")
    if width * height > max_pixels:
        raise ImageError(
            f"image of {width}×{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}; "
            "downscale it or raise max_pixels"
        )
    try:
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except DECODE_ERRORS as e:  # PIL reports bad data lazily, at decode time
        raise ImageError(f"the image could not be decoded ({e}); the file is truncated or corrupt") from e


def _open(source, name: str) -> Image.Image:
    try:
        img = Image.open(source)
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not an image file PIL can read") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({e})") from e
    except DECODE_ERRORS as e:
        raise ImageError(f"{name}: not a readable image ({e}); the file is corrupt or hostile") from e
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
