"""A night stopped on a real pool with submits in the air: what the API charged, what the
journals know, what was paid twice (README, "Cancelling the night" and "Stopping a worker
mid-night")::

    python -m benchmarks.pool_stops cancel-night /tmp/ps1
    python -m benchmarks.pool_stops cancel-runner /tmp/ps2
    python -m benchmarks.pool_stops stop-worker /tmp/ps3 --signal INT [--bare]
    python -m benchmarks.pool_stops stop-parent-worker /tmp/ps4 [--bare]

A Prefect server, two process workers and the repository's deployments
(``benchmarks/prefect_pool.py``), a simulator whose submits are answered ``--delay`` s after
it charged them (``[faults] submit_answer_delay_s``), a 300-row night in 30 shards on three
runners. Once more than 20 submits were accepted and every run of the night is running:

- ``cancel-night``: ``prefect flow-run cancel`` of the night; its runs end Cancelled.
- ``cancel-runner``: the same of one runner; the night goes on and finishes.
- ``stop-worker``: SIGTERM (or ``--signal INT``) to the worker running a runner, as
  ``systemctl stop`` does; the night goes on and finishes.
- ``stop-parent-worker``: the same to the worker running the night's own run; the night
  ends Interrupted (Lost with ``--bare``), runs again and finishes.

The workers are ``klein-batch worker`` (``flows/worker.py``); ``--bare``: ``prefect worker
start``, which kills its flow runs when stopped.

Printed: the runs' final states, the night's seconds, and ``charged`` (the simulator's
accepted submits), ``journaled`` (task ids across the shards' journals), ``paid_twice``
(the simulator's duplicate submits). Only 127.0.0.1; a few minutes each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.prefect_pool import (
    BIN,
    REPO,
    SHARD_DEPLOYMENT,
    api_get,
    descendants,
    flow_run_ids,
    flow_run_states,
    night_ended,
    prefect_pool,
    run,
    runner_runs,
    runs_flow_run,
    shared_key_toml,
    sim_stats,
    simulator,
    start_night,
)

KEY = "sk-pool-stops-5e1a9c"
ROWS = 300
FINAL = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


def write_night(path: Path) -> Path:
    lines = [f"n{n:03d},studio photo of mug number {n} on grey,SKU{n}" for n in range(ROWS)]
    path.write_text("id,prompt,sku\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def journaled(out: Path) -> int:
    """Distinct task ids the API acknowledged, across the shards' journals."""
    found: set[str] = set()
    for path in out.glob(".klein/shards/*/.klein/ledger.sqlite"):
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            found |= {row[0] for row in conn.execute("SELECT task_id FROM tasks") if row[0]}
        finally:
            conn.close()
    return len(found)


def night_runs(api: str, parent: str, earlier: frozenset[str]) -> list[dict[str, Any]]:
    return [api_get(api, f"/flow_runs/{parent}"), *runner_runs(api, earlier).values()]


def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise SystemExit(f"gave up waiting for {what}")


def measure(
    stop: str, tmp: Path, delay: float, sig: signal.Signals, *, bare: bool = False
) -> dict[str, Any]:
    (tmp / "pool").mkdir(parents=True, exist_ok=True)
    toml = shared_key_toml(KEY, 24, median_s=0.3, p95_s=0.6)
    toml += f"\n[faults]\nsubmit_answer_delay_s = {delay}\n"
    with (
        prefect_pool(tmp / "pool", KEY, bare_workers=bare) as pool,
        simulator(tmp / "sim", toml, pool["base"]) as sim_url,
    ):
        api = pool["api"]
        run([str(BIN / "python"), "-m", "flows.automations"], pool["client"])  # as production
        earlier = flow_run_ids(api)
        out = tmp / "out"
        parameters = {
            "manifest": str(write_night(tmp / "night.csv")),
            "spec": {"out": str(out), "api_url": sim_url, "max_active": 12},
            "shard_size": 10,
            "parallel_shards": 3,
            "api_key_block": "freepik-api-key",
            "shard_deployment": SHARD_DEPLOYMENT,
        }
        started = time.monotonic()
        parent = start_night(pool, parameters)

        def under_way() -> bool:
            runs = night_runs(api, parent, earlier)
            running = len(runs) == 3 and all(r["state_type"] == "RUNNING" for r in runs)
            return running and sim_stats(sim_url)["submits_accepted"] > 20

        wait_until(under_way, 300, "the night's three runs to be under way")
        stopped_at = time.monotonic()
        if stop == "cancel-night":
            run([str(BIN / "prefect"), "flow-run", "cancel", parent], pool["client"])
        elif stop == "cancel-runner":
            runner = runner_runs(api, earlier)["shard-runner-1"]["id"]
            run([str(BIN / "prefect"), "flow-run", "cancel", runner], pool["client"])
        else:
            victim = parent if stop == "stop-parent-worker" else None
            victim = victim or runner_runs(api, earlier)["shard-runner-1"]["id"]
            worker = next(
                w
                for w in pool["workers"].values()
                if any(runs_flow_run(pid, victim) for pid in descendants(w.pid))
            )
            os.kill(worker.pid, sig)

        def ended() -> list[dict[str, Any]] | None:
            runs = night_runs(api, parent, earlier)
            return runs if all(r["state_type"] in FINAL for r in runs) else None

        night_ended(api, parent, 900)  # a stopped night (Interrupted, Lost) runs again first
        runs = wait_until(ended, 120, "every run of the night to end")
        time.sleep(3)  # a runner's last answers
        stats = sim_stats(sim_url)
        return {
            "stop": stop if not stop.startswith("stop") else f"{stop} ({sig.name})",
            "workers": "prefect worker start" if bare else "klein-batch worker",
            "parent_states": [
                f"{state['type']}/{state['name']}" for state in flow_run_states(api, parent)
            ],
            "seconds_to_stop": round(stopped_at - started, 1),
            "night_s": round(time.monotonic() - started, 1),
            "states": sorted(f"{r['name']}: {r['state_name']}" for r in runs),
            "charged": stats["submits_accepted"],
            "journaled": journaled(out),
            "paid_twice": stats["duplicate_submits"],
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "stop", choices=("cancel-night", "cancel-runner", "stop-worker", "stop-parent-worker")
    )
    parser.add_argument("tmp", type=Path, help="a new folder for the pool, simulator, output")
    parser.add_argument("--delay", type=float, default=3.0, help="submit answer delay, s")
    parser.add_argument("--signal", choices=("TERM", "INT"), default="TERM")
    parser.add_argument(
        "--bare", action="store_true", help="workers are `prefect worker start` itself"
    )
    args = parser.parse_args(argv)
    os.chdir(REPO)
    sig = signal.Signals[f"SIG{args.signal}"]
    figures = measure(args.stop, args.tmp, args.delay, sig, bare=args.bare)
    json.dump(figures, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
