"""Scale-out for real: a Prefect server, a process work pool and two workers on 127.0.0.1.

The catalog's shards run as sub-flows of the ``catalog-shard`` deployment (deployed from
the repository's own ``prefect.yaml``) on both workers, against one simulator key that
runs in its own process. Checked from the outside: every row done exactly once, the key's
active tasks never above its tier, both workers took shards, and the shares leased from
the global concurrency limit never added up past the key's budget.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import polars as pl
import pytest
from flow_helpers import PROMPTS, write_catalog

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KEY = "sk-scale-out-test-5d2e8b"
TIER_ACTIVE = 4
#: Two shards for two workers that take one flow run at a time: both must work.
ROWS = 20
SHARD_SIZE = 10
#: One flow run at a time per worker, so concurrent shards have to land on both.
WORKER = ("--limit", "1", "--type", "process")

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


def sim_stats(url: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=5) as answer:
        return json.loads(answer.read())["keys"]["shared"]


def max_leased(shards: list[dict[str, object]]) -> int:
    """The most slots held at once, from each shard's lease interval."""
    events: list[tuple[float, int]] = []
    for shard in shards:
        events.append((float(shard["lease_acquired_at"]), int(shard["occupy"])))
        events.append((float(shard["lease_released_at"]), -int(shard["occupy"])))
    held = peak = 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):
        held += change
        peak = max(peak, held)
    return peak


def test_shards_spread_over_two_workers_sharing_one_key(tmp_path: Path) -> None:
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
    manifest = write_catalog(
        tmp_path / "catalog.csv",
        [(f"p{n:02d}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, ROWS + 1)],
    )
    out = tmp_path / "out"
    prefect = str(BIN / "prefect")
    with ExitStack() as stack:
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
        for name in ("worker-a", "worker-b"):
            stack.enter_context(
                process(
                    [prefect, "worker", "start", "--pool", "klein-pool", "--name", name, *WORKER],
                    client,
                    tmp_path / f"{name}.log",
                )
            )

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
        wait_for_workers(api, "klein-pool", {"worker-a", "worker-b"}, 90, tmp_path)
        flow = subprocess.run(
            [
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
                str(SHARD_SIZE),
                "--parallel-shards",
                "2",
                "--api-key-block",
                "freepik-api-key",
                "--shard-deployment",
                "generate-catalog-shard/catalog-shard",
            ],
            env=client,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
        )
        logs = "".join(p.read_text() for p in tmp_path.glob("worker-*.log"))
        assert flow.returncode == 0, flow.stderr[-4000:] + logs[-4000:]
        stats = sim_stats(sim_url)

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
    assert {shard["worker"] for shard in shards} == {"worker-a", "worker-b"}
    assert all(shard["occupy"] == TIER_ACTIVE // 2 for shard in shards)
    assert all(shard["summary"]["max_active"] == TIER_ACTIVE // 2 for shard in shards)
    assert max_leased(shards) <= TIER_ACTIVE
