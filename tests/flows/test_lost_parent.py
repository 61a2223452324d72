"""A lost parent, for real: the machine running a night's parent flow run dies.

A pool of its own (a Prefect server, on PostgreSQL when installed, and two process
workers on 127.0.0.1; ``benchmarks/prefect_pool.py``), so that this test, which waits out
90 s of missed heartbeats by design, runs beside ``test_scale_out.py`` rather than after
it. The automations of ``automations.yaml`` mark the parent Lost and run it again. A
worker stopped instead of lost is ``test_scale_out.py``'s, on that module's pool.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from flow_helpers import PROMPTS, write_catalog
from pool_nights import (
    SHARD_SIZE,
    TIER_ACTIVE,
    all_runners_ended,
    night_parameters,
    worker_logs,
    worker_of_the_parent,
    workers_running,
)

from benchmarks.prefect_pool import (
    BIN,
    api_get,
    api_post,
    descendants,
    flow_run_ids,
    flow_run_states,
    lose_machine,
    night_ended,
    prefect_pool,
    runner_runs,
    runs_flow_run,
    seconds_since,
    shared_key_toml,
    sim_stats,
    simulator,
    start_night,
)
from benchmarks.prefect_pool import run as run_command

KEY = "sk-lost-parent-test-8c3e1a"
LOST_SIM_TOML = shared_key_toml(KEY, TIER_ACTIVE, median_s=3.0, p95_s=5.0)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with prefect_pool(tmp_path_factory.mktemp("pool"), KEY) as started:
        yield started


#: The night whose parent is lost: 8 shards, long enough (a submit every 5 s per runner) that
#: the runners left are still at work when the parent runs again.
PARENT_ROWS = 48


@pytest.mark.slow(seconds=300)
@pytest.mark.timeout(900)
def test_a_lost_parent_is_marked_lost_and_its_night_runs_again(
    pool: dict[str, Any], tmp_path: Path
) -> None:
    """The machine running a night's parent (a nightly-catalog run) dies: the automations of
    automations.yaml mark the parent Crashed (named Lost) 60-95 s after its last heartbeat,
    which frees the deployment's concurrency slot at once, and schedule the same flow run
    again; it resumes the shards (the surviving runners finished or took over the rest) and
    merges the night into its own dated folder, with nothing acknowledged paid twice."""
    from datetime import datetime

    from pipeline.storage import dated

    api = pool["api"]
    workers_running(pool)
    nightly = api_get(api, "/deployments/name/generate-catalog/nightly-catalog")
    assert nightly["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    run_command([str(BIN / "python"), "-m", "flows.automations"], pool["client"])
    # A run whose machine died before its first heartbeat reached the server: Running, and
    # never a heartbeat. It is watched from its Running state, so it is marked Lost too.
    shard_flow = api_get(api, "/flows/name/generate-catalog-shard")
    ghost = api_post(
        api,
        "/flow_runs/",
        {
            "flow_id": shard_flow["id"],
            "name": "ghost-runner",
            "tags": ["klein-batch", "klein-heartbeat"],
            "state": {"type": "RUNNING"},
        },
    )["id"]
    ghost_at = time.time()
    earlier = flow_run_ids(api)
    manifest = write_catalog(
        tmp_path / "catalog.csv",
        [(f"n{n:02d}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, PARENT_ROWS + 1)],
    )
    with contextlib.ExitStack() as stack:
        sim_url = stack.enter_context(simulator(tmp_path / "sim", LOST_SIM_TOML, pool["base"]))
        # The key's own limits (a tier of its own), so the runners share it adaptively; the
        # runners left on the other machine are still at work when the parent runs again (a
        # submit every 5 s each), and they drain the queue together.
        parameters = night_parameters(
            manifest, tmp_path / "nightly" / "{date}", sim_url, per_minute=12, parallel=3
        )
        parent = start_night(pool, parameters)

        # Lose the parent's machine once it and a runner are running: its worker and every
        # process under it (a runner of the night, when the worker holds one), with SIGKILL.
        def a_runner_too() -> bool:
            return any(r["state_type"] == "RUNNING" for r in runner_runs(api, earlier).values())

        lost = worker_of_the_parent(pool, parent, a_runner_too)
        lost_runners = [
            r
            for r in runner_runs(api, earlier).values()
            if any(runs_flow_run(pid, r["id"]) for pid in descendants(lost.pid))
        ]
        killed_at = time.time()
        lose_machine(lost.pid)
        lost.wait(timeout=15)

        # The same flow run ends the night: Lost, scheduled again, run on the other worker.
        run = night_ended(api, parent, 600)
        states = flow_run_states(api, parent)
        night = all_runners_ended(api, earlier)
        stats = sim_stats(sim_url)

    names = [(state["type"], state["name"]) for state in states]
    ghost_states = flow_run_states(api, ghost)
    assert [(state["type"], state["name"]) for state in ghost_states] == [
        ("RUNNING", "Running"),
        ("CRASHED", "Lost"),
    ]
    ghost_lost_after = seconds_since(ghost_states[-1]["timestamp"], ghost_at)
    print(f"\na run with no heartbeat at all was Lost {ghost_lost_after:.0f} s after it ran")
    assert 85 <= ghost_lost_after <= 150
    assert run["state_type"] == "COMPLETED", (names, worker_logs(pool)[-4000:])
    assert ("CRASHED", "Lost") in names and ("SCHEDULED", "Rerun") in names, names
    # Live runs beat every 30 s (prefect.yaml), so only the lost ones are marked: the rerun
    # ran on for 100 s and more without being marked Lost again.
    assert names.count(("CRASHED", "Lost")) == 1, names
    # Leaving Running freed the deployment's slot at once: the rerun never waited for it.
    assert ("SCHEDULED", "AwaitingConcurrencySlot") not in names, names
    lost_state = next(s for s in states if s["name"] == "Lost")
    lost_after = seconds_since(lost_state["timestamp"], killed_at)
    done_after = seconds_since(states[-1]["timestamp"], killed_at)
    timeline = ", ".join(
        f"{s['name']} {seconds_since(s['timestamp'], killed_at):+.0f} s" for s in states
    )
    ended = ", ".join(f"{r['name']} {r['state_name']}" for r in night)
    print(f"\nthe parent's states, from the kill: {timeline}; its runners: {ended}")
    # 90 s without a heartbeat (every 30 s), the triggers' 5 s look, slack for a busy machine.
    assert 55 <= lost_after <= 150, timeline
    # Then the rerun: a worker starts it, it resumes every shard and merges.
    assert done_after <= lost_after + 240, timeline
    # `{date}` is the run's scheduled day, the same for the rerun: one folder for the night.
    scheduled = datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00"))
    out = Path(dated(str(tmp_path / "nightly" / "{date}"), scheduled))
    assert {p.name for p in (tmp_path / "nightly").iterdir()} == {out.name, "library"}
    done = pl.read_parquet(out / "manifest.parquet")
    assert done["row"].to_list() == list(range(1, PARENT_ROWS + 1))
    assert set(done["status"]) == {"succeeded"}
    assert (out / "run.json").exists() and (out / "report.html").exists()
    duplicates = stats["duplicate_submits"]
    assert stats["submits_accepted"] == PARENT_ROWS + duplicates
    assert duplicates <= json.loads((out / "run.json").read_text())["ambiguous_submits"]
    finished_by = {
        n: json.loads((out / f".klein/shards/{n}/shard.json").read_text())["pid"]
        for n in range(PARENT_ROWS // SHARD_SIZE)
    }
    print(f"shards finished by process: {finished_by}; {duplicates} sent twice")
    # No run of the night stays Running or Pending: runners on the lost machine, started or
    # starting, are Lost too.
    assert not {r["state_type"] for r in night} & {"RUNNING", "PENDING"}, ended
    marked = {r["id"] for r in night if r["state_name"] == "Lost"}
    assert {r["id"] for r in lost_runners} <= marked, ended
