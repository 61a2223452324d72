"""Fixtures for the end-to-end tests: simulators on 127.0.0.1 started per test."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
from pipeline_helpers import sim_config

from pipeline.sim import SimConfig, SimServer

if TYPE_CHECKING:
    from minute_storm import MinuteStorm


@pytest.fixture
def start_sim() -> Iterator[Callable[..., SimServer]]:
    """Start a simulator (in a thread, on an ephemeral port) with the given config changes."""
    with contextlib.ExitStack() as stack:

        def start(
            config: SimConfig | None = None, *, port: int = 0, **changes: object
        ) -> SimServer:
            server = SimServer.in_thread(config or sim_config(**changes), port=port)
            return stack.enter_context(server)

        yield start


@pytest.fixture
def sim(start_sim: Callable[..., SimServer]) -> SimServer:
    """A well-behaved simulator: standard tier, fast tasks, no faults."""
    return start_sim()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the minute-long rate-limit scenario early, so it overlaps the other tests."""
    if any("test_pipeline_tier_minute" in item.nodeid for item in session.items):
        from minute_storm import start_minute_storm

        start_minute_storm()


@pytest.fixture(scope="session")
def minute_storm() -> MinuteStorm:
    from minute_storm import start_minute_storm

    return start_minute_storm()
