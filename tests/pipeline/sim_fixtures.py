"""The simulator fixtures of the end-to-end tests, shared by tests/pipeline, bfl and webhooks.

A conftest imports ``start_sim`` and ``sim`` from here; pytest finds fixtures by name in
the conftest's namespace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from pipeline_helpers import sim_config

from pipeline.sim import SimConfig, SimServer


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
