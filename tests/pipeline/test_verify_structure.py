"""A JPEG without a thumbnail is verified by its structure: every cut is still caught.

The structural walk (``pipeline.verify.jpeg_size``) replaces the 1/8-scale decode for
images that get no contact-sheet thumbnail (past report.html's tiles, S3 outputs); it must
refuse a body cut anywhere, in a header or in a scan, baseline, progressive or with restart
markers, and agree with Pillow on the size of a whole one.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.verify import InvalidImage, inspect_image, jpeg_size


def _jpeg(**options: object) -> bytes:
    image = Image.effect_noise((120, 80), 60).convert("RGB")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80, **options)
    return out.getvalue()


SHAPES = {
    "baseline": {},
    "progressive": {"progressive": True},
    "restart-markers": {"restart_marker_blocks": 2},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_cut_of_a_jpeg_is_refused_and_a_whole_one_has_its_size(shape: str) -> None:
    data = _jpeg(**SHAPES[shape])
    assert jpeg_size(data) == (120, 80)
    assert jpeg_size(data + b"\x00\x00") == (120, 80)  # zero padding after the end
    for cut in range(1, len(data) - 1):
        with pytest.raises(InvalidImage):
            jpeg_size(data[:cut])


def test_without_a_thumbnail_the_structure_decides_and_with_one_the_decode_does() -> None:
    data = _jpeg()
    whole = inspect_image(data, expected_format="jpeg", expected_size=(120, 80))
    assert (whole.width, whole.height, whole.size) == (120, 80, len(data))
    with pytest.raises(InvalidImage, match="cut short"):
        inspect_image(data[: len(data) // 2], expected_format="jpeg", expected_size=(120, 80))
    with pytest.raises(InvalidImage, match="cut short"):
        inspect_image(data + b"junk", expected_format="jpeg", expected_size=(120, 80))
    with pytest.raises(InvalidImage, match="size is 120x80"):
        inspect_image(data, expected_format="jpeg", expected_size=(64, 64))
    with pytest.raises(InvalidImage, match="format is jpeg"):
        inspect_image(data, expected_format="png", expected_size=(120, 80))
    # A scan with its entropy-coded data gone (the next marker right after its header).
    sos = data.index(b"\xff\xda")
    header = int.from_bytes(data[sos + 2 : sos + 4], "big")
    emptied = data[: sos + 2 + header] + b"\xff\xd9"
    with pytest.raises(InvalidImage, match="no image data"):
        jpeg_size(emptied)
    thumbed = inspect_image(data, expected_format="jpeg", expected_size=(120, 80), thumbnail_px=32)
    assert thumbed.thumbnail is not None and thumbed.sha256 == whole.sha256
