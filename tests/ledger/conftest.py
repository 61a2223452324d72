"""Shared builders for the ledger, sink and output-manifest tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ledger_helpers import make_row

from pipeline.ledger import LEDGER_RELPATH, Ledger
from pipeline.rows import Row


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "dest" / LEDGER_RELPATH


@pytest.fixture
def ledger(ledger_path: Path) -> Iterator[Ledger]:
    with Ledger.open(ledger_path) as opened:
        opened.start_run("run-1", {"manifest": "catalog.csv", "dialect": "klein"})
        yield opened


@pytest.fixture
def rows() -> Callable[..., list[Row]]:
    def build(*indices: int) -> list[Row]:
        return [make_row(i) for i in indices]

    return build
