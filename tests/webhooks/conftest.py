"""Webhook tests reuse the end-to-end helpers of tests/pipeline (one way to check output)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))

from pipeline_helpers import sim_config

from pipeline.sim import SimConfig, SimServer


@pytest.fixture
def start_sim() -> Iterator[Callable[..., SimServer]]:
    """Start a simulator (in a thread, on an ephemeral port) with the given config changes."""
    with contextlib.ExitStack() as stack:

        def start(config: SimConfig | None = None, **changes: object) -> SimServer:
            return stack.enter_context(SimServer.in_thread(config or sim_config(**changes)))

        yield start


@pytest.fixture
def sim(start_sim: Callable[..., SimServer]) -> SimServer:
    """A well-behaved simulator: standard tier, fast tasks, no faults."""
    return start_sim()
