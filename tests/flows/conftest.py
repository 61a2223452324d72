"""Prefect for the flow tests: one temporary server per session (per xdist worker).

The private PREFECT_HOME of each test process is set in tests/conftest.py, before Prefect
is imported anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect server (SQLite in a temp dir) for every flow run in the session.

    Each xdist worker that runs one of these tests starts its own. The start may wait
    minutes for a CPU when the machine is busy: a slow start is not a failure.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
