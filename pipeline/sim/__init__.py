"""A local simulator of the FLUX.2 [klein] task API (both dialects), faults included.

Every test, demo and benchmark of klein-batch runs against it, so it enforces the
contract's rules exactly, behaves as the public API does where real client libraries look
(``server.py`` and ``bfl.py`` list how: a regional listener behind ``polling_url``, full
``result`` objects, JSON 404s, random task ids, per-model prices, dialects kept apart,
early ``Request Moderated``) and can reproduce production's bad days on demand::

    from pipeline.sim import SimConfig, SimServer

    async with SimServer(SimConfig()) as sim:       # http://127.0.0.1:<free port>
        ...                                          # key "sim-demo-key", tier standard
        sim.stats()["keys"]["demo"]["max_active"]
        sim.regional_url                             # where dialect B's polling_url points

    with SimServer.in_thread(SimConfig.from_toml("pipeline/sim/demo.toml")) as sim:
        ...

or ``python -m pipeline.sim --config pipeline/sim/demo.toml --port 8765``.
"""

from __future__ import annotations

from pipeline.sim.config import (
    EndpointFaults,
    FaultConfig,
    KeyConfig,
    LatencyConfig,
    ModerationConfig,
    PriceConfig,
    SimConfig,
    TierConfig,
)
from pipeline.sim.server import SimServer, create_app, serve
from pipeline.sim.webhooks import secret_bytes, sign

__all__ = [
    "EndpointFaults",
    "FaultConfig",
    "KeyConfig",
    "LatencyConfig",
    "ModerationConfig",
    "PriceConfig",
    "SimConfig",
    "SimServer",
    "TierConfig",
    "create_app",
    "secret_bytes",
    "serve",
    "sign",
]
