"""The simulator fixtures of the end-to-end tests, shared by tests/pipeline, bfl and webhooks.

A conftest imports ``start_sim`` and ``sim`` from here; pytest finds fixtures by name in
the conftest's namespace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pipeline_helpers import SimProcess, sim_config

from pipeline.sim import SimConfig, SimServer


@pytest.fixture
def start_sim(sim_images: str) -> Iterator[Callable[..., SimServer]]:
    """Start a simulator (in a thread, on an ephemeral port) with the given config changes;
    its images are kept in the test run's folder unless the config names another."""
    with contextlib.ExitStack() as stack:

        def start(
            config: SimConfig | None = None, *, port: int = 0, **changes: object
        ) -> SimServer:
            config = config or sim_config(**changes)
            if config.image_dir is None:
                config.image_dir = sim_images
            server = SimServer.in_thread(config, port=port)
            return stack.enter_context(server)

        yield start


@pytest.fixture
def sim(start_sim: Callable[..., SimServer]) -> SimServer:
    """A well-behaved simulator: standard tier, fast tasks, no faults."""
    return start_sim()


@pytest.fixture
def sim_process(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SimProcess]:
    """The simulator in a process of its own (it outlives a killed pipeline), configured by
    the test module's ``SIM_TOML``."""
    config = tmp_path / "sim.toml"
    config.write_text(request.module.SIM_TOML, encoding="utf-8")
    process = SimProcess(config)
    try:
        yield process
    finally:
        process.stop()
