"""Fixtures: a fast simulator on 127.0.0.1 and a client session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from sim_helpers import Client, fast_config

from pipeline.sim import SimServer


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(fast_config()) as server:
        yield server


@pytest.fixture
async def client(sim: SimServer, session: aiohttp.ClientSession) -> Client:
    return Client(sim, session)
