"""Helpers for the catalog workflow tests: a fast simulator and runs against it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl

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
