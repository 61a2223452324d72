"""Prefect for the flow tests: the session's server (``prefect_server`` in tests/conftest.py).

The private PREFECT_HOME of each test process is set in tests/conftest.py, before Prefect
is imported anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_api(prefect_server: str) -> Iterator[str]:
    """Flow runs in this process go to the session's temporary Prefect server."""
    yield prefect_server
