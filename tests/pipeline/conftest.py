"""Fixtures for the end-to-end tests: simulators on 127.0.0.1 started per test."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from sim_fixtures import sim, sim_process, start_sim  # noqa: F401 (fixtures, found by name)

if TYPE_CHECKING:
    from minute_storm import MinuteStorm


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the minute-long rate-limit scenario early, so it overlaps the other tests."""
    if any("test_pipeline_tier_minute" in item.nodeid for item in session.items):
        from minute_storm import start_minute_storm

        start_minute_storm(session.config)


@pytest.fixture(scope="session")
def minute_storm(pytestconfig: pytest.Config) -> MinuteStorm:
    from minute_storm import start_minute_storm

    return start_minute_storm(pytestconfig)
