"""Checks a downloaded image before it is stored: complete, decodable, the promised size.

A full decode of every image would cost more client CPU than everything else the pipeline
does, so JPEGs are decoded at 1/8 scale (every entropy-coded block is still read, so a
corrupt or cut stream fails) and PNGs are verified chunk by chunk (every CRC, including the
compressed pixel data). Both catch a body cut short behind an honest-looking header.

The 1/8-scale decode is also most of the work of a contact-sheet thumbnail, so a caller
can ask for one (``thumbnail_px``) instead of decoding every image a second time when
``report.html`` is built.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image

_FORMATS = {"JPEG": "jpeg", "PNG": "png"}


class InvalidImage(Exception):
    """The bytes are not the image the API promised."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: str
    width: int
    height: int
    sha256: str
    size: int
    #: A small JPEG made from the verification decode (``thumbnail_px``); None for PNGs
    #: and when none was asked for.
    thumbnail: bytes | None = None


def small_jpeg(image: Image.Image, size: int, quality: int) -> bytes:
    """``image`` shrunk in place to fit ``size`` x ``size``, as a JPEG (a thumbnail)."""
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    rgb = image.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def inspect_image(
    data: bytes,
    *,
    expected_format: str,
    expected_size: tuple[int, int],
    thumbnail_px: int | None = None,
    thumbnail_quality: int = 72,
) -> ImageInfo:
    """Verify ``data`` and describe it; raises ``InvalidImage`` saying what is wrong.

    With ``thumbnail_px`` a JPEG also gets ``ImageInfo.thumbnail``, from the same decode.
    """
    thumb: bytes | None = None
    if not data:
        raise InvalidImage("empty body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = _FORMATS.get(image.format or "")
            if fmt is None:
                raise InvalidImage(f"not a JPEG or PNG (got {image.format or 'unknown'})")
            size = image.size
            if fmt == "jpeg":
                if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
                    raise InvalidImage("JPEG stream is cut short (no end-of-image marker)")
                image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                image.load()
                if thumbnail_px:
                    thumb = small_jpeg(image, thumbnail_px, thumbnail_quality)
            else:
                image.verify()
    except InvalidImage:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise InvalidImage(f"does not decode: {exc}") from None
    if fmt != expected_format:
        raise InvalidImage(f"format is {fmt}, the request asked for {expected_format}")
    if size != tuple(expected_size):
        raise InvalidImage(
            f"size is {size[0]}x{size[1]}, the API promises {expected_size[0]}x{expected_size[1]}"
        )
    return ImageInfo(fmt, size[0], size[1], hashlib.sha256(data).hexdigest(), len(data), thumb)
