"""A fast simulator on 127.0.0.1 shared by a test's runs, and a small product table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from catalog_helpers import fast_sim

from pipeline.sim import SimServer


@pytest.fixture
def sim() -> Iterator[SimServer]:
    with SimServer.in_thread(fast_sim()) as server:
        yield server


@pytest.fixture
def products(tmp_path: Path) -> Path:
    path = tmp_path / "products.csv"
    path.write_text(
        "id,title,color,material,aspect_ratio\n"
        "mug-red,Classic mug,red,stoneware,\n"
        "mug-blue,Classic mug,blue,stoneware,portrait_2_3\n"
        "tote-tan,Leather tote,tan,leather,\n",
        encoding="utf-8",
    )
    return path
