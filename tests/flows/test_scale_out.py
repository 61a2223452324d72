"""Scale-out for real: a Prefect server, a process work pool and two workers on 127.0.0.1.

The catalog's shards are a queue (``flows/queue.py``): the flow's own process and two
runner flow runs of the ``catalog-shard`` deployment (deployed from the repository's own
``prefect.yaml``) on the two workers each claim the next unfinished shard, against one
simulator key that runs in its own process. The server runs on PostgreSQL when it is
installed (as the README's production section says), else on SQLite.

The tests share one pool (a server, PostgreSQL, two workers and the deployments: 40-50
CPU-seconds of the suite, its server's 2-3 a minute while it is up), each night against a
simulator of its own: a night spread over both workers and one cancelled, a worker lost
(killed with its processes), then a worker stopped (SIGTERM, as `systemctl stop`), which
installs the automations, last. The lost parent's test (``test_lost_parent.py``) has a pool
of its own, so that it runs beside these.

Checked from the outside: every row done exactly once, the key's active tasks never above
its tier, no shard's engine above the budget, the runners ended; and with a worker and its
processes killed with SIGKILL mid-run, the night still ends by itself: the lost shard is
taken over and resumed from its journal, the lost runner is marked crashed, and no
acknowledged task is paid twice; with the worker of a night's parent stopped, the parent
journals its submits in the air, runs again on the other worker and pays nothing twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from flow_helpers import PROMPTS, write_catalog
from pool_nights import (
    TIER_ACTIVE,
    all_runners_ended,
    flow_run,
    night_parameters,
    worker_logs,
    worker_of_the_parent,
    workers_running,
)

from benchmarks.pool_stops import journaled
from benchmarks.prefect_pool import (
    BIN,
    REPO,
    SHARD_DEPLOYMENT,
    api_get,
    descendants,
    flow_run_ids,
    flow_run_states,
    lose_machine,
    night_ended,
    prefect_pool,
    runner_runs,
    shared_key_toml,
    sim_stats,
    simulator,
    start_night,
)
from benchmarks.prefect_pool import run as run_command

#: One worker runs the tests (tests/conftest.py: ONE_WORKER_MODULES), so the pool starts once.
pytestmark = pytest.mark.slow(seconds=350)

KEY = "sk-scale-out-test-5d2e8b"
ROWS = 20
SHARD_SIZE = 5
SIM_TOML = shared_key_toml(KEY, TIER_ACTIVE, median_s=0.3, p95_s=0.6)


#: The key's own contract as a config file's tier: runners share a budget that is the
#: key's whole limit adaptively (a `--max-active` below a built-in tier's would be a share of
#: that key, split between the runners in fixed parts; the cancelled night runs so).
FLOW_TOML = f"""
tier = "shared"

[tiers.shared]
max_active = {TIER_ACTIVE}
submits_per_minute = 900
"""


def flow_command(manifest: Path, out: Path, sim_url: str, shard_size: int) -> list[str]:
    config = manifest.parent / "klein.toml"
    config.write_text(FLOW_TOML)
    return [
        str(BIN / "python"),
        "-X",
        "faulthandler",
        "-m",
        "flows.catalog",
        str(manifest),
        "--out",
        str(out),
        "--api-url",
        sim_url,
        "--config",
        str(config),
        "--shard-size",
        str(shard_size),
        "--parallel-shards",
        "3",
        "--api-key-block",
        "freepik-api-key",
        "--shard-deployment",
        SHARD_DEPLOYMENT,
    ]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with prefect_pool(tmp_path_factory.mktemp("pool"), KEY) as started:
        yield started


def runners_ended(api: str, earlier: frozenset[str]) -> dict[str, dict[str, Any]]:
    """The night's runner flow runs once none is running: a runner that found the queue
    empty reports its final state from its own process, seconds after the parent ended."""
    deadline = time.monotonic() + 60
    while True:
        runners = runner_runs(api, earlier)
        states = {run["state_type"] for run in runners.values()}
        if not states & {"SCHEDULED", "PENDING", "RUNNING"} or time.monotonic() > deadline:
            return runners
        time.sleep(1)


#: The module's pool (its set-up counts here: about 100 s on a busy machine), a night, then
#: one cancelled: more than the suite's 300 s default on a slow hour. With room to spare, a
#: night that does not end says which of its runs did not, not pytest-timeout's stack.
@pytest.mark.timeout(600)
def test_shards_spread_over_two_workers_sharing_one_key(
    pool: dict[str, Any], tmp_path: Path
) -> None:
    manifest = write_catalog(
        tmp_path / "catalog.csv",
        [(f"p{n:02d}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, ROWS + 1)],
    )
    out = tmp_path / "out"
    earlier = flow_run_ids(pool["api"])
    with simulator(tmp_path / "sim", SIM_TOML, pool["base"]) as sim_url:
        pool = pool | {"sim_url": sim_url}
        flow = subprocess.run(
            flow_command(manifest, out, pool["sim_url"], SHARD_SIZE),
            env=pool["client"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
        )
        logs = worker_logs(pool)
        assert flow.returncode == 0, flow.stderr[-4000:] + logs[-4000:]
        stats = sim_stats(pool["sim_url"])
        runners = runners_ended(pool["api"], earlier)
    nightly = api_get(pool["api"], "/deployments/name/generate-catalog/nightly-catalog")
    # The same pool, a second night, cancelled mid-way (a pool of its own would cost the
    # suite another server and two workers). It was on demand while its deployment
    # parameters were stale (the parent failed at once, so no runner ever started);
    # KLEIN_PREFECT_CANCEL=0 leaves it out.
    if os.environ.get("KLEIN_PREFECT_CANCEL") != "0":
        cancel_a_night_mid_way(pool, tmp_path)
    server_log = pool["server_log"].read_text()

    done = pl.read_parquet(out / "manifest.parquet")
    assert done["row"].to_list() == list(range(1, ROWS + 1))
    assert set(done["status"]) == {"succeeded"}
    assert stats["submits_accepted"] == ROWS  # every row exactly once, nothing paid twice
    assert 0 < stats["max_active"] <= TIER_ACTIVE
    assert KEY not in flow.stdout + flow.stderr + logs
    shards = [
        json.loads((out / f".klein/shards/{n}/shard.json").read_text())
        for n in range(ROWS // SHARD_SIZE)
    ]
    # Each shard ran with the whole budget, shared adaptively (the key's 429s divide it).
    assert all(shard["summary"]["max_active"] == TIER_ACTIVE for shard in shards)
    # Two runners on the pool were started, and each ended: finished its share of the queue,
    # or was cancelled unstarted because the queue was empty before a worker took it.
    assert set(runners) == {"shard-runner-1", "shard-runner-2"}
    assert {run["state_type"] for run in runners.values()} <= {"COMPLETED", "CANCELLED"}
    assert "database is locked" not in server_log
    # prefect.yaml: the scheduled night never overlaps itself.
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"


#: A night long enough that runners on both workers are mid-shard when one machine is lost.
LOST_ROWS = 60
LOST_SHARD_SIZE = 6
LOST_SIM_TOML = shared_key_toml(KEY, TIER_ACTIVE, median_s=3.0, p95_s=5.0)


def running_shard_pids(out: Path, shards: int) -> dict[int, int]:
    """The process running each unfinished shard, from the pid its journal records."""
    from pipeline.ledger import Ledger

    pids: dict[int, int] = {}
    for index in range(shards):
        folder = out / ".klein" / "shards" / str(index)
        journal = folder / ".klein" / "ledger.sqlite"
        if (folder / "shard.json").exists() or not journal.exists():
            continue
        try:
            with Ledger.open(journal, readonly=True) as ledger:
                pid = ledger.run_info().get("pid")
        except Exception:  # a journal still being created
            continue
        if isinstance(pid, int):
            pids[index] = pid
    return pids


@pytest.mark.timeout(900)
def test_a_lost_worker_never_hangs_the_night(pool: dict[str, Any], tmp_path: Path) -> None:
    manifest = write_catalog(
        tmp_path / "catalog.csv",
        [(f"l{n:02d}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, LOST_ROWS + 1)],
    )
    out = tmp_path / "out"
    shards = LOST_ROWS // LOST_SHARD_SIZE
    earlier = flow_run_ids(pool["api"])
    with simulator(tmp_path / "sim", LOST_SIM_TOML, pool["base"]) as sim_url:
        pool = pool | {"sim_url": sim_url}
        flow_log = tmp_path / "flow.log"
        with flow_log.open("wb") as handle:
            flow = subprocess.Popen(
                flow_command(manifest, out, pool["sim_url"], LOST_SHARD_SIZE),
                env=pool["client"],
                cwd=REPO,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
            try:
                # Wait until a runner on either worker is mid-shard (which worker the server
                # hands runs to is its choice), then lose that machine: the worker and every
                # process under it, with SIGKILL.
                deadline = time.monotonic() + 180
                victim: tuple[int, int] | None = None
                while victim is None and time.monotonic() < deadline:
                    assert flow.poll() is None, flow_log.read_text()[-4000:]
                    running = running_shard_pids(out, shards)
                    for worker in pool["workers"].values():
                        below = descendants(worker.pid)
                        for index, pid in running.items():
                            if pid in below:
                                victim, lost = (index, pid), worker
                                break
                        if victim is not None:
                            break
                    time.sleep(0.3)
                assert victim is not None, "no runner on a worker took a shard"
                lose_machine(lost.pid)
                lost.wait(timeout=15)
                # Bounded: the claim's lease (60 s), the repossessor's look, the rerun of the
                # shard, then 30 s for the lost runner to be declared crashed.
                code = flow.wait(timeout=300)
            finally:
                if flow.poll() is None:
                    flow.send_signal(signal.SIGABRT)  # -X faulthandler: where it hangs
                    time.sleep(2)
                    flow.kill()
                    flow.wait(timeout=15)
        output = flow_log.read_text()
        assert code == 0, output[-4000:] + worker_logs(pool)[-3000:]
        stats = sim_stats(pool["sim_url"])
        runners = runner_runs(pool["api"], earlier)

    index, killed_pid = victim
    done = pl.read_parquet(out / "manifest.parquet")
    assert done["row"].to_list() == list(range(1, LOST_ROWS + 1))
    assert set(done["status"]) == {"succeeded"}
    taken_over = json.loads((out / f".klein/shards/{index}/shard.json").read_text())
    assert taken_over["pid"] != killed_pid  # another runner finished the lost shard
    summary = json.loads((out / "run.json").read_text())
    duplicates = stats["duplicate_submits"]
    # Resumed from its journal: every task acknowledged before the kill was polled, not paid
    # again; only a submit whose answer the kill cut off can have been sent twice.
    assert stats["submits_accepted"] == LOST_ROWS + duplicates
    assert duplicates <= summary["ambiguous_submits"], (duplicates, summary)
    assert 0 < stats["max_active"] <= TIER_ACTIVE
    states = sorted(run["state_type"] for run in runners.values())
    assert "CRASHED" in states and set(states) <= {"CRASHED", "COMPLETED", "CANCELLED"}, states
    assert KEY not in output


#: The cancelled night: a submit rate of one a second (the spec's ``submits_per_minute``,
#: split between the runners) makes it long enough to be cancelled while its runners run,
#: however slowly they start, at the cost of few rows.
CANCEL_ROWS = 300
CANCEL_SHARD_SIZE = 10
#: It uses 3 of its key's 8 active tasks: runners each get a fixed part of a budget below
#: the key's, since no 429 of the key would stop them at 3 between them.
CANCEL_KEY_ACTIVE = 8
CANCEL_MAX_ACTIVE = 3
#: How long the cancelled night's runs get to read Cancelled: all did within 10 s of the
#: command when this passed.
CANCEL_WAIT_S = 150


def cancel_a_night_mid_way(pool: dict[str, Any], tmp_path: Path) -> None:
    """`prefect flow-run cancel` of a nightly-catalog run stops the parent on its worker and,
    through the flow's cancellation hook, the runner flow runs on the pool: every run of
    the night ends Cancelled and nothing is submitted after."""
    toml = shared_key_toml(KEY, CANCEL_KEY_ACTIVE, median_s=0.3, p95_s=0.6)
    # Each submit answered 1.5 s after the API charged it: the cancel finds some in the air.
    toml += "\n[faults]\nsubmit_answer_delay_s = 1.5\n"
    with simulator(tmp_path / "cancel-sim", toml, pool["base"]) as sim_url:
        stats = cancel_against(pool | {"sim_url": sim_url}, tmp_path)
    # Every task the API charged is in a shard's journal, so the next night polls it
    # instead of paying for its row again: the SIGTERM that ends each flow run's process
    # waits for those answers (flows/sigterm.py; before it, 34 charged and 30 journaled).
    assert journaled(tmp_path / "cancelled") == stats["submits_accepted"], stats
    # The runners' parts of the night's budget never added up past it, and no runner took
    # slots of the key's other jobs (its 429s).
    assert 0 < stats["max_active"] <= CANCEL_MAX_ACTIVE, stats
    assert stats["submits_refused"] == 0, stats


def cancel_against(pool: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    api = pool["api"]
    earlier = flow_run_ids(api)
    manifest = write_catalog(
        tmp_path / "cancelled.csv",
        [(f"c{n:03d}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, CANCEL_ROWS + 1)],
    )
    parameters = {
        "manifest": str(manifest),
        # The run specification (pipeline/spec.py), as the deployment's parameters carry it.
        "spec": {
            "out": str(tmp_path / "cancelled"),
            "api_url": pool["sim_url"],
            "max_active": CANCEL_MAX_ACTIVE,
            "submits_per_minute": 60,
        },
        "shard_size": CANCEL_SHARD_SIZE,
        "parallel_shards": 3,
        "api_key_block": "freepik-api-key",
        "shard_deployment": SHARD_DEPLOYMENT,
    }
    parent = start_night(pool, parameters)

    def night() -> list[dict[str, Any]]:
        runners = list(runner_runs(api, earlier).values())
        return [flow_run(api, parent), *runners]

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = night()
        assert runs[0]["state_type"] in ("SCHEDULED", "PENDING", "RUNNING"), runs[0]
        if all(run["state_type"] == "RUNNING" for run in runs) and len(runs) > 1:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"no runner started: {[(r['name'], r['state_type']) for r in runs]}")
    run_command([str(BIN / "prefect"), "flow-run", "cancel", parent], pool["client"])
    deadline = time.monotonic() + CANCEL_WAIT_S
    while time.monotonic() < deadline:
        runs = night()
        if all(run["state_type"] == "CANCELLED" for run in runs):
            break
        time.sleep(1)
    else:
        left = [
            (run["name"], run["id"], run["state_type"], run["state_name"], run["end_time"])
            for run in runs
        ]
        raise AssertionError(
            f"the night's runs {CANCEL_WAIT_S} s after the cancel: {left}\n"
            f"{worker_logs(pool)[-6000:]}"
        )
    submitted = sim_stats(pool["sim_url"])["submits_accepted"]
    time.sleep(3)
    stats = sim_stats(pool["sim_url"])
    assert stats["submits_accepted"] == submitted  # nothing runs
    assert submitted < CANCEL_ROWS  # part of the night's rows
    return stats


#: The night whose parent's worker is stopped: the parent has submits in the air when it is
#: (each answered 1.5 s after the API charged it).
STOPPED_ROWS = 48
STOPPED_SIM_TOML = (
    shared_key_toml(KEY, TIER_ACTIVE, median_s=1.0, p95_s=2.0)
    + "\n[faults]\nsubmit_answer_delay_s = 1.5\n"
)


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
