"""A local simulator of the FLUX.2 [klein] task API (dialect A), faults included.

Every test, demo and benchmark of klein-batch runs against it, so it enforces the
contract's rules exactly and can reproduce production's bad days on demand::

    from pipeline.sim import SimConfig, SimServer

    async with SimServer(SimConfig()) as sim:       # http://127.0.0.1:<free port>
        ...                                          # key "sim-demo-key", tier standard
        sim.stats()["keys"]["demo"]["max_active"]

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
    "SimConfig",
    "SimServer",
    "TierConfig",
    "create_app",
    "secret_bytes",
    "serve",
    "sign",
]
