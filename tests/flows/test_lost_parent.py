"""A lost parent, for real: the machine running a night's parent flow run dies; and its
worker stopped instead (``klein-batch worker``, as ``systemctl stop`` stops it).

A pool of its own (a Prefect server, on PostgreSQL when installed, and two process
workers on 127.0.0.1; ``benchmarks/prefect_pool.py``), so these tests run beside
``test_scale_out.py`` rather than after it, and beside each other (a module-scoped pool
started by each test process that draws one): the first waits out 90 s of missed
heartbeats by design. The automations of ``automations.yaml`` mark the parent Lost and
run it again.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from flow_helpers import PROMPTS, write_catalog

from benchmarks.pool_stops import journaled
from benchmarks.prefect_pool import (
    BIN,
    SHARD_DEPLOYMENT,
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

#: Each test on a worker and a pool of its own: together on one worker they took 437 s of
#: a suite whose parallel part took 504 (the first waits out 90 s without heartbeats).

KEY = "sk-lost-parent-test-8c3e1a"
TIER_ACTIVE = 4
LOST_SHARD_SIZE = 6
LOST_SIM_TOML = shared_key_toml(KEY, TIER_ACTIVE, median_s=3.0, p95_s=5.0)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with prefect_pool(tmp_path_factory.mktemp("pool"), KEY) as started:
        yield started


def worker_logs(pool: dict[str, Any]) -> str:
    return "".join(p.read_text() for p in pool["logs"].glob("worker-*.log"))


def flow_run(api: str, run_id: str) -> dict[str, Any]:
    return api_get(api, f"/flow_runs/{run_id}")


#: The night whose parent is lost: 8 shards, long enough (a submit every 5 s per runner) that
#: the runners left are still at work when the parent runs again.
PARENT_ROWS = 48


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
    """A night of ``LOST_SHARD_SIZE`` shards on a key of ``TIER_ACTIVE`` slots and
    ``per_minute`` submits (the key's own limits, so the runners share it adaptively)."""
    tier = {"name": "shared", "max_active": TIER_ACTIVE, "submits_per_minute": per_minute}
    return {
        "manifest": str(manifest),
        "spec": {"out": str(out), "api_url": sim_url, "tier": "shared", "tiers": {"shared": tier}},
        "shard_size": LOST_SHARD_SIZE,
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
        for n in range(PARENT_ROWS // LOST_SHARD_SIZE)
    }
    print(f"shards finished by process: {finished_by}; {duplicates} sent twice")
    # No run of the night stays Running or Pending: runners on the lost machine, started or
    # starting, are Lost too.
    assert not {r["state_type"] for r in night} & {"RUNNING", "PENDING"}, ended
    marked = {r["id"] for r in night if r["state_name"] == "Lost"}
    assert {r["id"] for r in lost_runners} <= marked, ended


def workers_running(pool: dict[str, Any]) -> None:
    """Both workers up: start again one that an earlier test of this module stopped."""
    for name, worker in list(pool["workers"].items()):
        if worker.poll() is not None:
            pool["start_worker"](name)


#: The night whose parent's worker is stopped: the parent has submits in the air when it is
#: (each answered 1.5 s after the API charged it).
STOPPED_ROWS = 48
STOPPED_SIM_TOML = (
    shared_key_toml(KEY, TIER_ACTIVE, median_s=1.0, p95_s=2.0)
    + "\n[faults]\nsubmit_answer_delay_s = 1.5\n"
)


@pytest.mark.slow(seconds=110)
@pytest.mark.timeout(600)
def test_a_stopped_worker_stops_the_night_first_and_it_runs_again(
    pool: dict[str, Any], tmp_path: Path
) -> None:
    """`systemctl stop` of the `klein-batch worker` running a night's parent, its submits in
    the air: the worker stops the parent first, which journals every task the API charged
    and ends Crashed named Interrupted; automations.yaml runs it again on the other worker,
    which polls those tasks, pays for nothing twice and merges the night. (`prefect worker
    start` SIGKILLs its flow runs when stopped: 4-8 rows paid twice per stop, measured with
    `python -m benchmarks.pool_stops stop-worker DIR --bare`.)"""
    api = pool["api"]
    workers_running(pool)
    run_command([str(BIN / "python"), "-m", "flows.automations"], pool["client"])
    earlier = flow_run_ids(api)
    manifest = write_catalog(
        tmp_path / "catalog.csv",
        [(f"s{n:02d}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, STOPPED_ROWS + 1)],
    )
    out = tmp_path / "out"
    with simulator(tmp_path / "sim", STOPPED_SIM_TOML, pool["base"]) as sim_url:
        parameters = night_parameters(manifest, out, sim_url, per_minute=30, parallel=2)
        parent = start_night(pool, parameters)
        stopped = worker_of_the_parent(
            pool, parent, lambda: sim_stats(sim_url)["submits_accepted"] >= 6
        )
        stopped.send_signal(signal.SIGTERM)  # what systemctl stop sends
        code = stopped.wait(timeout=90)
        run = night_ended(api, parent, 400)
        states = flow_run_states(api, parent)
        all_runners_ended(api, earlier)
        stats = sim_stats(sim_url)

    names = [(state["type"], state["name"]) for state in states]
    assert code == 0, worker_logs(pool)[-3000:]
    assert run["state_type"] == "COMPLETED", (names, worker_logs(pool)[-4000:])
    # Stopped by its worker, not lost: never marked Lost, run again at once.
    interrupted = names.index(("CRASHED", "Interrupted"))
    assert names[interrupted + 1] == ("SCHEDULED", "Rerun"), names
    assert ("CRASHED", "Lost") not in names, names
    done = pl.read_parquet(out / "manifest.parquet")
    assert done["row"].to_list() == list(range(1, STOPPED_ROWS + 1))
    assert set(done["status"]) == {"succeeded"}
    # Every task the API charged is in a journal; the rerun polled those, paid none twice.
    assert stats["duplicate_submits"] == 0, stats
    assert stats["submits_accepted"] == STOPPED_ROWS == journaled(out), stats
