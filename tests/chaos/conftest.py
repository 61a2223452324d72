"""Soak tests run only on demand: ``pytest -m soak tests/chaos`` or ``KLEIN_SOAK=1``.

The chaos simulators of one test run, on every xdist worker, keep their images in one
folder (``image_dir``): each scenario runs the same catalog in a simulator process of its
own, and rendered it again.
"""

from __future__ import annotations

import os

import chaos_helpers
import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_image_folder(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> None:
    # Under xdist each worker's base folder sits in the run's own (pytest-N/popen-gwK).
    base = tmp_path_factory.getbasetemp()
    run = base.parent if worker_id != "master" else base
    chaos_helpers.IMAGE_DIR = str(run / "chaos-sim-images")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = "soak" in (config.option.markexpr or "") or os.environ.get("KLEIN_SOAK") == "1"
    if wanted:
        return
    skip = pytest.mark.skip(reason="soak test: run with -m soak or KLEIN_SOAK=1")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
