"""A nightly catalog whose Prefect server is restarted while the night runs: what happens.

    .venv/bin/python -m benchmarks.server_restart [--rows 120] [--shard-size 10]
        [--down 120] [--signal TERM|KILL] [--after 30] [--lease-storage memory|filesystem]

A trial rather than a ratio: a Prefect server on 127.0.0.1 (PostgreSQL when installed), two
process workers, the repository's deployments and ``automations.yaml``, and a simulated key
of 4 active tasks (median 3 s, p95 5 s, a submit every 5 s per runner). It starts a
``nightly-catalog`` run with runners on the pool, and ``--after`` seconds after the parent
and a runner are running it stops the server (``--signal``: SIGTERM for a clean stop,
SIGKILL for a crash) for ``--down`` seconds, then starts it again on the same port and
database. Printed: the parent's states from the stop, whether its first process was still
alive when the night ended, the runners' end states, whether the night merged
(``manifest.parquet``, ``run.json``, ``report.html``), the simulator's accepted submits
against the rows (paid twice), and the wall time from the stop to the night's end.
Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.prefect_pool import (
    BIN,
    SHARD_DEPLOYMENT,
    api_get,
    api_post,
    descendants,
    flow_run_ids,
    flow_run_states,
    prefect_pool,
    run,
    runner_runs,
    runs_flow_run,
    seconds_since,
    shared_key_toml,
    sim_stats,
    simulator,
    start_night,
)

KEY = "sk-server-restart-5d1c"
TIER_ACTIVE = 4
SIM_TOML = shared_key_toml(KEY, TIER_ACTIVE, median_s=3.0, p95_s=5.0)
PROMPTS = ("red mug on white", "blue tote bag", "brass desk lamp", "linen notebook")
#: States a flow run ends in (Crashed too: the automation may schedule it again).
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
LEASE_STORAGE = "prefect.server.concurrency.lease_storage."


def write_manifest(path: Path, rows: int) -> Path:
    lines = ["id,prompt,sku"]
    lines += [f"r{n:04d},{PROMPTS[n % len(PROMPTS)]} {n},SKU{n}" for n in range(1, rows + 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def night_parameters(manifest: Path, out: str, sim_url: str, shard_size: int) -> dict[str, Any]:
    """A night on the pool: three runners (the parent and two flow runs) share the key."""
    return {
        "manifest": str(manifest),
        "spec": {
            "out": out,
            "api_url": sim_url,
            "tier": "shared",
            "tiers": {
                "shared": {"name": "shared", "max_active": TIER_ACTIVE, "submits_per_minute": 12}
            },
        },
        "shard_size": shard_size,
        "parallel_shards": 3,
        "api_key_block": "freepik-api-key",
        "shard_deployment": SHARD_DEPLOYMENT,
    }


def processes_of(pool: dict[str, Any], run_id: str) -> set[int]:
    """The processes on the pool's workers that run flow run ``run_id``."""
    return {
        pid
        for worker in pool["workers"].values()
        for pid in descendants(worker.pid)
        if runs_flow_run(pid, run_id)
    }


def alive(pids: set[int]) -> bool:
    return any(Path(f"/proc/{pid}").exists() for pid in pids)


def wait_until_running(pool: dict[str, Any], parent: str, earlier: frozenset[str]) -> None:
    """Until the parent and a runner of its night are running on the pool."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        state = api_get(pool["api"], f"/flow_runs/{parent}")["state_type"]
        runners = runner_runs(pool["api"], earlier).values()
        if state == "RUNNING" and any(r["state_type"] == "RUNNING" for r in runners):
            return
        time.sleep(0.5)
    raise AssertionError("the parent and a runner did not run on the pool")


def wait_for_the_end(api: str, parent: str, *, settle: float, limit: float) -> dict[str, Any]:
    """Until the parent completed, or ended otherwise and stayed so for ``settle`` s (the
    automation may still schedule it again), or ``limit`` s passed."""
    deadline = time.monotonic() + limit
    ended_since: float | None = None
    while True:
        try:
            found = api_get(api, f"/flow_runs/{parent}")
        except OSError:
            time.sleep(2)
            continue
        if found["state_type"] == "COMPLETED" or time.monotonic() > deadline:
            return found
        if found["state_type"] in FINAL:
            ended_since = ended_since or time.monotonic()
            if time.monotonic() - ended_since > settle:
                return found
        else:
            ended_since = None
        time.sleep(2)


def restart_night(
    folder: Path,
    *,
    rows: int,
    shard_size: int,
    down_s: float,
    sig: signal.Signals,
    after_s: float,
    lease_storage: str,
) -> dict[str, Any]:
    """One night with one server restart; what happened (see the module docstring)."""
    (folder / "pool").mkdir(parents=True)
    manifest = write_manifest(folder / "catalog.csv", rows)
    settings = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE + lease_storage}
    with (
        prefect_pool(folder / "pool", KEY, server_settings=settings) as pool,
        simulator(folder / "sim", SIM_TOML, pool["base"]) as sim_url,
    ):
        api = pool["api"]
        run([str(BIN / "python"), "-m", "flows.automations"], pool["client"])
        earlier = flow_run_ids(api)
        out = folder / "nightly"
        parent = start_night(pool, night_parameters(manifest, str(out), sim_url, shard_size))
        wait_until_running(pool, parent, earlier)
        started = time.time()
        time.sleep(after_s)
        first = processes_of(pool, parent)
        accepted_before = sim_stats(sim_url)["submits_accepted"]
        stopped_at = time.time()
        pool["server"].stop(sig)
        time.sleep(down_s)
        pool["server"].start()
        back_at = time.time()
        first_ended: float | None = None
        # Whether the first process of the parent lives on, while the night ends.
        deadline = time.monotonic() + 1200
        found = api_get(api, f"/flow_runs/{parent}")
        ended_since: float | None = None
        while time.monotonic() < deadline:
            if first_ended is None and not alive(first):
                first_ended = time.time()
            found = wait_for_the_end(api, parent, settle=0, limit=2)
            if found["state_type"] == "COMPLETED":
                break
            # Ended otherwise, and its first process too (a live one may still complete it):
            # the automation may still run it again; 150 s tells.
            if found["state_type"] in FINAL and first_ended is not None:
                ended_since = ended_since or time.monotonic()
                if time.monotonic() - ended_since > 150:
                    break
            else:
                ended_since = None
        ended_at = time.time()
        time.sleep(5)
        stats = sim_stats(sim_url)
        runners = runner_runs(api, earlier)
        states = flow_run_states(api, parent)
        still_running = alive(first)
        # Slots still counted once the night is over: a server that forgot leases (kept in
        # memory) leaves them taken with nobody to give them back.
        held = {
            limit["name"]: limit["active_slots"]
            for limit in api_post(api, "/v2/concurrency_limits/filter", {})
            if limit["active_slots"]
        }
    names = ("manifest.parquet", "run.json", "report.html")
    merged = {name: (out / name).exists() for name in names}
    logs = "".join(p.read_text(errors="replace") for p in (folder / "pool").glob("worker-*.log"))
    return {
        "signal": sig.name,
        "down_s": down_s,
        "lease_storage": lease_storage,
        "rows": rows,
        "night_ran_before_stop_s": round(stopped_at - started, 1),
        "accepted_before_stop": accepted_before,
        "parent_states_from_stop": [
            f"{s['type']}/{s['name']} {seconds_since(s['timestamp'], stopped_at):+.0f}s"
            for s in states
        ],
        "parent_end": f"{found['state_type']}/{found['state_name']}",
        "parent_message": (found.get("state") or {}).get("message"),
        "first_process_ended_s_after_stop": round(first_ended - stopped_at, 1)
        if first_ended
        else None,
        "first_process_alive_at_end": still_running,
        "server_back_s_after_stop": round(back_at - stopped_at, 1),
        "night_end_s_after_stop": round(ended_at - stopped_at, 1),
        "runners": {name: f"{r['state_type']}/{r['state_name']}" for name, r in runners.items()},
        "merged": merged,
        "submits_accepted": stats["submits_accepted"],
        "paid_twice": stats["submits_accepted"] - rows,
        "duplicate_submits": stats["duplicate_submits"],
        "slots_still_held_after": held,
        "lease_renewal_failed": logs.count("Concurrency lease renewal failed"),
        "claims_lost": logs.count("claim lost"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=120)
    parser.add_argument("--shard-size", type=int, default=10)
    parser.add_argument("--down", type=float, default=120.0)
    parser.add_argument("--signal", choices=("TERM", "KILL"), default="TERM")
    parser.add_argument("--after", type=float, default=30.0)
    parser.add_argument("--lease-storage", choices=("memory", "filesystem"), default="filesystem")
    parser.add_argument("--keep", help="keep the night's folder here (logs, output)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.keep:
            folder = Path(args.keep)
            folder.mkdir(parents=True, exist_ok=False)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="klein-restart-")))
        result = restart_night(
            folder / "n1",
            rows=args.rows,
            shard_size=args.shard_size,
            down_s=args.down,
            sig=signal.Signals[f"SIG{args.signal}"],
            after_s=args.after,
            lease_storage=args.lease_storage,
        )
        print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
