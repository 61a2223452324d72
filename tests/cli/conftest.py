"""Manifests and reference images on disk for the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

GOOD_CSV = """id,prompt,aspect_ratio,resolution,input_image,sku
mug-red,red mug on white,square_1_1,1k,shots/red.png,SKU1
mug-blue,blue mug on white,portrait_2_3,2k,,SKU2
mug-green,green mug,,,shots/red.png,SKU3
"""

BAD_CSV = """id,prompt,aspect_ratio,seed,input_image,sku
a1,red mug on white,square_1_1,5,shots/red.png,SKU1
a2,blue mug,square_9_9,,,SKU2
a3,,,,,SKU3
a1,red mug again,,,,SKU4
a5,mug,,-3,,SKU5
a6,mug,,,shots/missing.png,SKU6
a7,mug,,,shots/broken.png,SKU7
a8,mug,,,https://example.com/x.png,SKU8
"""


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    """A folder with good.csv, bad.csv and the reference images they point at."""
    shots = tmp_path / "shots"
    shots.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(shots / "red.png")
    (shots / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "good.csv").write_text(GOOD_CSV, encoding="utf-8")
    (tmp_path / "bad.csv").write_text(BAD_CSV, encoding="utf-8")
    return tmp_path
