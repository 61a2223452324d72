"""Soak tests run only on demand: ``pytest -m soak tests/chaos`` or ``KLEIN_SOAK=1``."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = "soak" in (config.option.markexpr or "") or os.environ.get("KLEIN_SOAK") == "1"
    if wanted:
        return
    skip = pytest.mark.skip(reason="soak test: run with -m soak or KLEIN_SOAK=1")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
