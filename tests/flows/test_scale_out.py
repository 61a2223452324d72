"""Scale-out for real: a Prefect server, a process work pool and two workers on 127.0.0.1.

The catalog's shards are a queue (``flows/queue.py``): the flow's own process and two
runner flow runs of the ``catalog-shard`` deployment (deployed from the repository's own
``prefect.yaml``) on the two workers each claim the next unfinished shard, against one
simulator key that runs in its own process. The server runs on PostgreSQL when it is
installed (as the README's production section says), else on SQLite.

Checked from the outside: every row done exactly once, the key's active tasks never above
its tier, no shard's engine above the budget, the runners ended; and with a worker and its
processes killed with SIGKILL mid-run, the night still ends by itself: the lost shard is
taken over and resumed from its journal, the lost runner is marked crashed, and no
acknowledged task is paid twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from flow_helpers import PROMPTS, write_catalog

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KEY = "sk-scale-out-test-5d2e8b"
TIER_ACTIVE = 4
ROWS = 20
SHARD_SIZE = 5
WORKER = ("--limit", "2", "--type", "process")

SIM_TOML = f"""
[[keys]]
name = "shared"
key = "{KEY}"
tier = "standard"
max_active = {TIER_ACTIVE}

[latency]
median_s = 0.3
p95_s = 0.6
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{url}: process exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout} s: {log.read_text()[-3000:]}")


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own session, stopped (with whatever it started) on the way out."""
    handle = log.open("wb")
    child = subprocess.Popen(
        args, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield child
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=15)
        handle.close()


def wait_for_workers(api: str, pool: str, names: set[str], timeout: float, logs: Path) -> None:
    """Both workers polling before any run exists: a slow starter would see none of them."""
    deadline = time.monotonic() + timeout
    online: set[str] = set()
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"{api}/work_pools/{pool}/workers/filter",
            data=b"{}",
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            workers = json.loads(answer.read())
        online = {w["name"] for w in workers if w.get("status") == "ONLINE"}
        if names <= online:
            return
        time.sleep(0.5)
    found = "".join(p.read_text()[-1500:] for p in logs.glob("worker-*.log"))
    raise AssertionError(f"workers online after {timeout} s: {sorted(online)}; {found}")


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]} {done.stderr[-3000:]}"
    return done.stdout


def start_simulator(stack: ExitStack, env: dict[str, str], tmp: Path) -> str:
    config = tmp / "sim.toml"
    config.write_text(SIM_TOML, encoding="utf-8")
    log = tmp / "sim.log"
    sim = stack.enter_context(
        process(
            [str(BIN / "python"), "-m", "pipeline.sim", "--config", str(config), "--port", "0"],
            env,
            log,
        )
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"http://127\.0\.0\.1:\d+", log.read_text())
        if found:
            return found.group(0)
        assert sim.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"simulator did not start: {log.read_text()}")


def sim_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=5) as answer:
        return json.loads(answer.read())["keys"]["shared"]


def api_post(api: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"{api}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def runner_runs(api: str) -> dict[str, dict[str, Any]]:
    """The shard runner flow runs by name (``shard-runner-N``)."""
    runs = api_post(api, "/flow_runs/filter", {"limit": 50})
    return {run["name"]: run for run in runs if run["name"].startswith("shard-runner-")}


def find_postgres() -> Path | None:
    """Debian's PostgreSQL server binaries (``postgresql`` package), or None."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


@contextmanager
def postgres() -> Iterator[str | None]:
    """A throwaway PostgreSQL on 127.0.0.1 for the Prefect server, when one is installed.

    The SQLite server logs ``database is locked`` with two workers; production runs the
    server on PostgreSQL (README), so this test does too where it can. As root (a CI
    container) the cluster runs as the ``postgres`` user, since initdb refuses root.
    """
    bin_dir = find_postgres()
    if bin_dir is None:
        yield None
        return
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="klein-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    data, log, port = folder / "data", folder / "postgres.log", free_port()
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "prefect", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    pg_ctl = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data)]
    options = f"-h 127.0.0.1 -p {port} -k {folder}"
    subprocess.run(
        [*pg_ctl, "-o", options, "-l", str(log), "-w", "start"],
        check=True,
        stdout=subprocess.DEVNULL,  # the server inherits it: a pipe would never close
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    try:
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*pg_ctl, "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def work_pool(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A Prefect server, the simulator, two process workers and the repository's
    deployments; yields what a test needs to start the flow and watch it."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FREEPIK", "BFL"))}
    base.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PWD=str(REPO),
    )
    server_env = base | {
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    client = base | {"PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    prefect = str(BIN / "prefect")
    with ExitStack() as stack:
        database = stack.enter_context(postgres())
        if database is not None:
            server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
        server_log = tmp_path / "server.log"
        server = stack.enter_context(
            process(
                [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                server_env,
                server_log,
            )
        )
        sim_url = start_simulator(stack, base, tmp_path)
        wait_for(f"{api}/health", server, 90, server_log)

        run([prefect, "work-pool", "create", "klein-pool", "--type", "process"], client)
        workers = {
            name: stack.enter_context(
                process(
                    [prefect, "worker", "start", "--pool", "klein-pool", "--name", name, *WORKER],
                    client,
                    tmp_path / f"{name}.log",
                )
            )
            for name in ("worker-a", "worker-b")
        }
        run(
            [
                str(BIN / "python"),
                "-c",
                "import os; from prefect.blocks.system import Secret; "
                "Secret(value=os.environ['SECRET']).save('freepik-api-key', overwrite=True)",
            ],
            client | {"SECRET": KEY},
        )
        run([prefect, "--no-prompt", "deploy", "--all"], client)
        wait_for_workers(api, "klein-pool", set(workers), 90, tmp_path)
        yield {
            "api": api,
            "client": client,
            "sim_url": sim_url,
            "workers": workers,
            "database": database,
            "server_log": server_log,
        }


def flow_command(manifest: Path, out: Path, sim_url: str, shard_size: int) -> list[str]:
    return [
        str(BIN / "python"),
        "-m",
        "flows.catalog",
        str(manifest),
        "--out",
        str(out),
        "--api-url",
        sim_url,
        "--max-active",
        str(TIER_ACTIVE),
        "--shard-size",
        str(shard_size),
        "--parallel-shards",
        "3",
        "--api-key-block",
        "freepik-api-key",
        "--shard-deployment",
        "generate-catalog-shard/catalog-shard",
    ]


def worker_logs(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in tmp_path.glob("worker-*.log"))


def test_shards_spread_over_two_workers_sharing_one_key(tmp_path: Path) -> None:
    manifest = write_catalog(
        tmp_path / "catalog.csv",
        [(f"p{n:02d}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, ROWS + 1)],
    )
    out = tmp_path / "out"
    with work_pool(tmp_path) as pool:
        flow = subprocess.run(
            flow_command(manifest, out, pool["sim_url"], SHARD_SIZE),
            env=pool["client"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
        )
        logs = worker_logs(tmp_path)
        assert flow.returncode == 0, flow.stderr[-4000:] + logs[-4000:]
        stats = sim_stats(pool["sim_url"])
        runners = runner_runs(pool["api"])
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
    # Each shard ran with the whole budget, shared adaptively: never above it.
    assert all(0 < shard["summary"]["max_active"] <= TIER_ACTIVE for shard in shards)
    # Two runners on the pool were started, and each ended: finished its share of the queue,
    # or was cancelled unstarted because the queue was empty before a worker took it.
    assert set(runners) == {"shard-runner-1", "shard-runner-2"}
    assert {run["state_type"] for run in runners.values()} <= {"COMPLETED", "CANCELLED"}
    assert "database is locked" not in server_log
