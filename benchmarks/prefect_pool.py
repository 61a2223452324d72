"""A local Prefect work pool for measuring and testing the catalog deployment for real.

A Prefect server on 127.0.0.1 (on PostgreSQL when Debian's ``postgresql`` is installed, as
the README's production section runs it: the SQLite server logs ``database is locked``
with two workers), the simulator in its own process, two process workers and the
repository's own ``prefect.yaml`` deployments. ``benchmarks/flow_scale_out.py`` and
``tests/flows/test_scale_out.py`` share it, so the measurement and the test run the same
setup.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.ports import free_port

REPO = Path(__file__).resolve().parents[1]
#: Prefect's file-based lease storage (``flows/leases.py``), as production runs it.
FILE_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
BIN = Path(sys.executable).parent
#: Two workers, each running up to two flow runs at once (a parent and a runner, say).
WORKER = ("--limit", "2", "--type", "process")
#: How often a worker asks the server for flow runs to start (Prefect's default: 10 s):
#: 3 s starts a runner within seconds and costs an idle pool 3.5 CPU-seconds a minute, 1 s
#: (``work_pool``'s, for the scale-out benchmark's figures) 6.5.
WORKER_QUERY_S = "3"
#: Pool and deployment names as ``prefect.yaml`` has them.
POOL = "klein-pool"
SHARD_DEPLOYMENT = "generate-catalog-shard/catalog-shard"


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
    handle = log.open("ab")
    child = subprocess.Popen(
        args, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield child
    finally:
        if child.poll() is None:
            below = descendants(child.pid)  # a session of their own, some of them
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=15)
            for pid in below:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        handle.close()


class PrefectServer:
    """The pool's Prefect server process, which a test can stop and start again.

    Users restart their server (an upgrade, maintenance, a crash) while a night runs; the
    database (PostgreSQL or the SQLite file under ``PREFECT_HOME``) and the port stay, so
    ``start`` after ``stop`` is the same server to every client. ``stop`` sends ``sig`` to
    the server's whole process group (SIGTERM: a clean shutdown; SIGKILL: a crash) and
    waits for it to end.
    """

    def __init__(self, args: list[str], env: dict[str, str], log: Path, api: str) -> None:
        self.args = args
        self.env = env
        self.log = log
        self.api = api
        self.child: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def __enter__(self) -> PrefectServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGTERM)

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def start(self, timeout: float = 90) -> None:
        """Start the server (again) and wait until it answers; its log is appended to."""
        assert self.child is None or self.child.poll() is not None, "the server is running"
        self.starts += 1
        with self.log.open("ab") as handle:
            handle.write(f"\n--- start {self.starts} ---\n".encode())
            handle.flush()
            self.child = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=REPO,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(f"{self.api}/health", self.child, timeout, self.log)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the server and everything it started; SIGKILL if SIGTERM takes over 15 s."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=15)
        # Whatever the group left (uvicorn's children) ends with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)


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


def start_simulator(stack: ExitStack, env: dict[str, str], tmp: Path, toml: str) -> str:
    config = tmp / "sim.toml"
    config.write_text(toml, encoding="utf-8")
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


def shared_key_toml(key: str, max_active: int, median_s: float, p95_s: float) -> str:
    """The simulator's config for the pool's one key, ``shared`` (``sim_stats`` reads it):
    the ``standard`` tier with ``max_active`` slots and that task latency."""
    return f"""
[[keys]]
name = "shared"
key = "{key}"
tier = "standard"
max_active = {max_active}

[latency]
median_s = {median_s}
p95_s = {p95_s}
"""


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


def api_get(api: str, path: str) -> Any:
    with urllib.request.urlopen(f"{api}{path}", timeout=10) as answer:
        return json.loads(answer.read())


def runner_runs(api: str, earlier: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """The shard runner flow runs by name (``shard-runner-N``), leaving out the ids in
    ``earlier``: every night names its runners alike, so a pool that ran one night before
    passes that night's ids."""
    runs = api_post(api, "/flow_runs/filter", {"limit": 200})
    return {
        run["name"]: run
        for run in runs
        if run["name"].startswith("shard-runner-") and run["id"] not in earlier
    }


def flow_run_states(api: str, run_id: str) -> list[dict[str, Any]]:
    """A flow run's states, oldest first."""
    states = api_get(api, f"/flow_run_states/?flow_run_id={run_id}")
    return sorted(states, key=lambda state: state["timestamp"])


def night_ended(api: str, parent: str, timeout: float) -> dict[str, Any]:
    """The night's own flow run once it is Completed, Failed or Cancelled, or as it is after
    ``timeout`` seconds. Crashed is not the end: a night marked Lost or Interrupted is run
    again by ``automations.yaml``, and a live attempt may still complete a run marked Lost.
    A server that does not answer (a test restarting it) is asked again."""
    deadline = time.monotonic() + timeout
    found: dict[str, Any] = {}
    while True:
        with contextlib.suppress(OSError):
            found = api_get(api, f"/flow_runs/{parent}")
            if found["state_type"] in ("COMPLETED", "FAILED", "CANCELLED"):
                return found
        if time.monotonic() > deadline:
            return found
        time.sleep(2)


def start_night(pool: dict[str, Any], parameters: dict[str, Any]) -> str:
    """Start a ``nightly-catalog`` run with ``parameters`` from the pool's client side; its
    flow run id."""
    script = (
        "import json, sys\n"
        "from prefect.deployments import run_deployment\n"
        "run = run_deployment('generate-catalog/nightly-catalog', "
        "parameters=json.loads(sys.argv[1]), timeout=0)\n"
        "print(run.id)\n"
    )
    command = [str(BIN / "python"), "-c", script, json.dumps(parameters)]
    return run(command, pool["client"]).split()[-1]


def runs_flow_run(pid: int, run_id: str) -> bool:
    """Whether process ``pid`` runs flow run ``run_id`` (the worker puts its id in the env)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"PREFECT__FLOW_RUN_ID={run_id}".encode() in environ.split(b"\0")


def seconds_since(stamp: str, since: float) -> float:
    """An API timestamp (ISO 8601, ``Z``) as seconds after ``since`` (a ``time.time()``)."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - since


def flow_run_ids(api: str) -> frozenset[str]:
    """Every flow run the server has: what a night started on a used pool is not among them."""
    return frozenset(run["id"] for run in api_post(api, "/flow_runs/filter", {"limit": 200}))


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
def prefect_pool(
    tmp_path: Path,
    secret: str,
    *,
    own_work_dirs: bool = False,
    server_settings: dict[str, str] | None = None,
    bare_workers: bool = False,
    query_s: str = WORKER_QUERY_S,
) -> Iterator[dict[str, Any]]:
    """A Prefect server (on PostgreSQL when installed), two process workers and the
    repository's deployments, the API key in the ``freepik-api-key`` Secret block; yields
    what a caller needs to start the flow and watch it. The simulator is the caller's
    (``simulator``), so one pool can serve nights against differently shaped keys.

    ``own_work_dirs``: each worker keeps the journals of S3 outputs in a work dir of its
    own (``$KLEIN_BATCH_WORK_DIR``), as two machines would, instead of sharing this one's.
    ``server_settings``: more variables for the server process only. The server is
    ``pool["server"]`` (``PrefectServer``): stop and start it to restart it on the same
    port and database. The workers are ``klein-batch worker``, as README starts them
    (``pool["workers"]`` are those processes; the Prefect worker and its flow runs are
    below each); ``bare_workers``: ``prefect worker start`` itself. ``query_s``: the
    workers' ``PREFECT_WORKER_QUERY_SECONDS``.
    """
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FREEPIK", "BFL"))}
    base.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PWD=str(REPO),
    )
    server_env = (
        base
        | {
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            # Lapsed claims are revoked within 5 s instead of 15 (README: the takeover bound).
            "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
            # Leases kept on disk, as README's production section runs the server: a restarted
            # server still knows them (in memory, it forgets them and their slots stay taken).
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": FILE_LEASES,
        }
        | (server_settings or {})
    )
    client = base | {"PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": query_s}
    prefect = str(BIN / "prefect")
    with ExitStack() as stack:
        database = stack.enter_context(postgres())
        if database is not None:
            server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
        server_log = tmp_path / "server.log"
        server = stack.enter_context(
            PrefectServer(
                [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                server_env,
                server_log,
                api,
            )
        )

        run([prefect, "work-pool", "create", POOL, "--type", "process"], client)
        starter = (
            [prefect, "worker", "start"] if bare_workers else [str(BIN / "klein-batch"), "worker"]
        )
        workers: dict[str, subprocess.Popen[bytes]] = {}

        def start_worker(name: str) -> subprocess.Popen[bytes]:
            """Start worker ``name`` (again: a test stopped or lost it); its log appends."""
            env = client | {"KLEIN_BATCH_WORK_DIR": str(tmp_path / f"work-{name}")}
            workers[name] = stack.enter_context(
                process(
                    [*starter, "--pool", POOL, "--name", name, *WORKER],
                    env if own_work_dirs else client,
                    tmp_path / f"{name}.log",
                )
            )
            return workers[name]

        for name in ("worker-a", "worker-b"):
            start_worker(name)
        run(
            [
                str(BIN / "python"),
                "-c",
                "import os; from prefect.blocks.system import Secret; "
                "Secret(value=os.environ['SECRET']).save('freepik-api-key', overwrite=True)",
            ],
            client | {"SECRET": secret},
        )
        run([prefect, "--no-prompt", "deploy", "--all"], client)
        wait_for_workers(api, POOL, set(workers), 90, tmp_path)
        yield {
            "api": api,
            "client": client,
            "base": base,
            "workers": workers,
            "start_worker": start_worker,
            "database": database,
            "server_log": server_log,
            "server": server,
            "logs": tmp_path,
        }


@contextmanager
def simulator(tmp: Path, toml: str, env: dict[str, str]) -> Iterator[str]:
    """The simulator in its own process with the key ``toml`` describes: its base URL."""
    tmp.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        yield start_simulator(stack, env, tmp, toml)


@contextmanager
def work_pool(tmp_path: Path, sim_toml: str, secret: str) -> Iterator[dict[str, Any]]:
    """``prefect_pool`` with a simulator of its own (``sim_url``)."""
    with (
        prefect_pool(tmp_path, secret, query_s="1") as pool,
        simulator(tmp_path, sim_toml, pool["base"]) as sim_url,
    ):
        yield pool | {"sim_url": sim_url}


def lose_machine(pid: int) -> None:
    """Kill ``pid`` and every process below it at once, as a machine that dies does.

    Each is stopped (SIGSTOP) before any is killed. Killed one after another, a Prefect
    process still alive saw its child's death and reported the flow run Crashed to the
    server, which a dead machine never does: the lost parent's night stayed Crashed, not
    Lost, and never ran again (a CI run of tests/flows/test_lost_parent.py, 2026-12-06).
    """
    tree = [pid, *descendants(pid)]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for each in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, sig)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), however deep."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
