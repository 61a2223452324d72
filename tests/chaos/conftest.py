"""Soak tests run only on demand: ``pytest -m soak tests/chaos`` or ``KLEIN_SOAK=1``.

The chaos simulators keep their images in the test run's folder (``sim_images``): each
scenario runs the same catalog in a simulator process of its own, and rendered it again.
"""

from __future__ import annotations

import os

import chaos_helpers
import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_image_folder(sim_images: str) -> None:
    chaos_helpers.IMAGE_DIR = sim_images


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = "soak" in (config.option.markexpr or "") or os.environ.get("KLEIN_SOAK") == "1"
    if wanted:
        return
    skip = pytest.mark.skip(reason="soak test: run with -m soak or KLEIN_SOAK=1")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
