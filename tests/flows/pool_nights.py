"""Nights on a real pool (``benchmarks/prefect_pool.py``), watched from the outside: the
helpers the scale-out, lost-parent and server-restart tests share."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.prefect_pool import SHARD_DEPLOYMENT, api_get, api_post, descendants, runs_flow_run

#: The key's slots in the pool tests' simulators, and the rows of a shard of their nights.
TIER_ACTIVE = 4
SHARD_SIZE = 6


def worker_logs(pool: dict[str, Any]) -> str:
    return "".join(p.read_text() for p in pool["logs"].glob("worker-*.log"))


def flow_run(api: str, run_id: str) -> dict[str, Any]:
    return api_get(api, f"/flow_runs/{run_id}")


def workers_running(pool: dict[str, Any]) -> None:
    """Both workers up: start again one that an earlier test of the module stopped or lost."""
    for name, worker in list(pool["workers"].items()):
        if worker.poll() is not None:
            pool["start_worker"](name)


def all_runners_ended(api: str, earlier: frozenset[str]) -> list[dict[str, Any]]:
    """Every runner flow run of a night (a night run twice names its runners alike) once
    none is running, or after 120 s."""
    deadline = time.monotonic() + 120
    while True:
        runs = api_post(api, "/flow_runs/filter", {"limit": 200})
        runners = [
            run
            for run in runs
            if run["name"].startswith("shard-runner-") and run["id"] not in earlier
        ]
        states = {run["state_type"] for run in runners}
        if not states & {"SCHEDULED", "PENDING", "RUNNING"} or time.monotonic() > deadline:
            return runners
        time.sleep(1)


def night_parameters(
    manifest: Path, out: Path, sim_url: str, *, per_minute: int, parallel: int
) -> dict[str, Any]:
    """A night of ``SHARD_SIZE`` shards on a key of ``TIER_ACTIVE`` slots and
    ``per_minute`` submits (the key's own limits, so the runners share it adaptively)."""
    tier = {"name": "shared", "max_active": TIER_ACTIVE, "submits_per_minute": per_minute}
    return {
        "manifest": str(manifest),
        "spec": {"out": str(out), "api_url": sim_url, "tier": "shared", "tiers": {"shared": tier}},
        "shard_size": SHARD_SIZE,
        "parallel_shards": parallel,
        "api_key_block": "freepik-api-key",
        "shard_deployment": SHARD_DEPLOYMENT,
    }


def worker_of_the_parent(
    pool: dict[str, Any], parent: str, ready: Callable[[], bool]
) -> subprocess.Popen[bytes]:
    """The worker running the night's parent, once the parent runs and ``ready()``."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        run = flow_run(pool["api"], parent)
        assert run["state_type"] in ("SCHEDULED", "PENDING", "RUNNING"), run["state"]
        if run["state_type"] == "RUNNING" and ready():
            for worker in pool["workers"].values():
                if any(runs_flow_run(pid, parent) for pid in descendants(worker.pid)):
                    return worker
        time.sleep(0.3)
    raise AssertionError("the parent did not run on the pool, or never got under way")
