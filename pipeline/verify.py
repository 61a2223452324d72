"""Checks a downloaded image before it is stored: complete, decodable, the promised size.

A full decode of every image would cost more client CPU than everything else the pipeline
does. PNGs are verified chunk by chunk (every CRC, including the compressed pixel data).
A JPEG that gets a contact-sheet thumbnail is decoded at 1/8 scale (every entropy-coded
block is still read, so a corrupt or cut stream fails), and the thumbnail comes from that
decode. Any other JPEG (past report.html's ``INLINE_THUMBS``, or stored on S3, where no
thumbnail cache is kept) has its structure walked instead (``jpeg_size``: every marker
segment inside the body, a frame header giving the size, entropy-coded data in each scan,
the end-of-image marker last): about a tenth of the decode's CPU, and it still catches
a body cut short anywhere, behind an honest-looking header or not. What it cannot see is
entropy-coded data corrupted in place without changing its length; HTTPS and the
download's length check leave that to a broken API.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image

_FORMATS = {"JPEG": "jpeg", "PNG": "png"}

#: The end of a scan's entropy-coded data: a marker (0xFF not followed by a stuffed 0x00
#: or a restart marker, which belong to the data).
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
#: Start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC), which carry the size.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_CUT_SHORT = "JPEG stream is cut short (no end-of-image marker)"


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


def jpeg_size(data: bytes) -> tuple[int, int]:
    """A JPEG's (width, height) from walking its structure; ``InvalidImage`` if it is not
    whole: see the module docstring for what this checks and what it cannot."""
    end = len(data)
    if not data.startswith(b"\xff\xd8"):
        raise InvalidImage("not a JPEG (no start-of-image marker)")
    pos = 2
    size: tuple[int, int] | None = None
    scans = 0
    while True:
        if pos >= end:
            raise InvalidImage(_CUT_SHORT)
        if data[pos] != 0xFF:
            raise InvalidImage(f"JPEG structure is broken (no marker at byte {pos})")
        while pos < end and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= end:
            raise InvalidImage(_CUT_SHORT)
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # end of image
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a segment
            continue
        if pos + 2 > end:
            raise InvalidImage(_CUT_SHORT)
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > end:
            raise InvalidImage(_CUT_SHORT)
        if marker in _SOF_MARKERS:
            if length < 8:
                raise InvalidImage("JPEG frame header is too short")
            height = int.from_bytes(data[pos + 3 : pos + 5], "big")
            width = int.from_bytes(data[pos + 5 : pos + 7], "big")
            size = (width, height)
        pos += length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            found = _SCAN_END.search(data, pos)
            if found is None:
                raise InvalidImage(_CUT_SHORT)
            if found.start() == pos:
                raise InvalidImage("JPEG scan holds no image data")
            scans += 1
            pos = found.start()
    if size is None or scans == 0:
        raise InvalidImage("JPEG has no frame header or no scan")
    if data[pos:].strip(b"\x00"):
        raise InvalidImage(_CUT_SHORT)  # as the decode path says of trailing bytes
    return size


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
    if not thumbnail_px and data.startswith(b"\xff\xd8\xff"):
        fmt, size = "jpeg", jpeg_size(data)  # no thumbnail wanted: the structure will do
        return _described(data, fmt, size, expected_format, expected_size, None)
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
    return _described(data, fmt, size, expected_format, expected_size, thumb)


def _described(
    data: bytes,
    fmt: str,
    size: tuple[int, int],
    expected_format: str,
    expected_size: tuple[int, int],
    thumb: bytes | None,
) -> ImageInfo:
    """The image's description once it is known whole: the format and size asked for."""
    if fmt != expected_format:
        raise InvalidImage(f"format is {fmt}, the request asked for {expected_format}")
    if size != tuple(expected_size):
        raise InvalidImage(
            f"size is {size[0]}x{size[1]}, the API promises {expected_size[0]}x{expected_size[1]}"
        )
    return ImageInfo(fmt, size[0], size[1], hashlib.sha256(data).hexdigest(), len(data), thumb)
