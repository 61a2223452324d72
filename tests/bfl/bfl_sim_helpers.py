"""Helpers for dialect B tests against the simulator: a fast config and a raw submit."""

from __future__ import annotations

import dataclasses
from typing import Any

import aiohttp

from pipeline.sim import LatencyConfig, SimConfig, SimServer

KEY = "sim-demo-key"
HEADERS = {"x-key": KEY}
MODEL = "flux-2-klein-4b"


def config(**changes: Any) -> SimConfig:
    """Defaults with tasks that finish in tens of milliseconds, and ``changes``."""
    fast = SimConfig(latency=LatencyConfig(median_s=0.05, p95_s=0.1))
    return dataclasses.replace(fast, **changes)


async def submit(
    server: SimServer, session: aiohttp.ClientSession, model: str = MODEL, **body: Any
) -> tuple[int, Any]:
    """POST a dialect B submit on the global host; the status and the JSON answer."""
    body.setdefault("prompt", "a red shoe on white")
    async with session.post(f"{server.url}/v1/{model}", json=body, headers=HEADERS) as r:
        return r.status, await r.json()
