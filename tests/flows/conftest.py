"""Prefect for the flow tests: a private PREFECT_HOME and one temporary server per session.

The environment is set before Prefect is imported anywhere in the session, so no test
touches the user's ~/.prefect and nothing reports analytics.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

_HOME = tempfile.mkdtemp(prefix="klein-prefect-home-")
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
if not os.environ.get("PREFECT_API_URL"):
    os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect server (SQLite in a temp dir) for every flow run in the session."""
    from prefect.testing.utilities import prefect_test_harness

    # Generous: on a loaded machine (CI running beside other jobs) the server takes long.
    with prefect_test_harness(server_startup_timeout=180):
        yield
