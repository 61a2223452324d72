"""Helpers for the catalog workflow tests: a fast simulator and runs against it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Self

import polars as pl
from aiohttp import web

from pipeline.run import RunOptions, run_manifest
from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer
from pipeline.summary import RunSummary

KEY = "sim-demo-key"


def fast_sim(**changes: Any) -> SimConfig:
    """Tasks that finish in tens of milliseconds; a key whose limits match the run's."""
    config = SimConfig(
        keys=[KeyConfig(max_active=8, submits_per_minute=100_000)],
        latency=LatencyConfig(median_s=0.05, p95_s=0.1),
    )
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def run(
    manifest: Any, out: Path, sim: SimServer, *, options: RunOptions | None = None, **kwargs: Any
) -> RunSummary:
    """A run against ``sim`` with quick polling (the engine's first poll is learned)."""
    options = options or RunOptions()
    options.expected_latency_s = 0.05
    options.progress_interval_s = 0.05
    return run_manifest(
        manifest,
        out,
        api_url=sim.url,
        api_key=KEY,
        max_active=8,
        submits_per_minute=100_000,
        options=options,
        **kwargs,
    )


def output(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "manifest.parquet")


def charged(sim: SimServer) -> float:
    return round(float(sim.stats()["totals"]["credits_charged"]), 2)


def accepted(sim: SimServer) -> int:
    return int(sim.stats()["totals"]["submits_accepted"])


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("FREEPIK_API_KEY", "BFL_API_KEY")}


KLEIN_BATCH = str(Path(sys.executable).parent / "klein-batch")


def klein(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``klein-batch ARGS`` as a user types it, without any API key in its environment."""
    return subprocess.run(
        [KLEIN_BATCH, *args], capture_output=True, text=True, env=clean_env(), cwd=cwd, timeout=120
    )


class ImageHost:
    """A shop's image host on 127.0.0.1 (an ephemeral port), in a thread of its own so a
    run in the test's thread can fetch from it: ``GET /{name}`` answered by ``_handle``."""

    def __init__(self) -> None:
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/{name}", self._handle)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def three_products(path: Path, extra: dict[str, list[str | None]] | None = None) -> Path:
    """A Shopify export: a one-variant mug, a three-variant tee, a one-variant cap, with
    ``extra`` columns (a line each)."""
    pl.DataFrame(
        {
            "Handle": ["mug", "tee", "tee", "tee", "cap"],
            "Title": ["Mug", "Tee", None, None, "Cap"],
            "Option1 Name": ["Title", "Size", None, None, "Title"],
            "Option1 Value": ["Default Title", "S", "M", "L", "Default Title"],
            "Variant SKU": ["MUG", "TEE-S", "TEE-M", "TEE-L", "CAP"],
            **(extra or {}),
        }
    ).write_csv(path)
    return path
