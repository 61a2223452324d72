"""Settings every test process needs before anything imports Prefect, and the serial part.

The suite runs in parallel (pytest-xdist, see ``.ci/run``): each worker is its own process,
so each gets its own ``PREFECT_HOME`` here. Prefect's ephemeral server keeps its SQLite
database there, and two workers sharing one would lock each other out ("database is
locked") or see each other's flow runs. This conftest is the first one pytest imports, so
the variables are set before any test module (or a subprocess a test starts, which
inherits them) can read them. No test touches the user's ~/.prefect and nothing reports
analytics.

Tests marked ``serial`` assert a bound on timing that other workers competing for the two
cores would decide instead of the code; ``--part parallel`` leaves them out and ``--part
serial`` runs only them, which is how ``.ci/run`` runs them: on two workers (one core each;
together they use less than one), beside the parallel part where the machine lets it
give that part only the CPU they leave (``.ci/idle-group``), else after it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from work_order import PREFECT_WORKERS, next_unit

_HOME = tempfile.mkdtemp(prefix="klein-prefect-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
if not os.environ.get("PREFECT_API_URL"):
    os.environ.pop("PREFECT_API_URL", None)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--part",
        choices=("all", "parallel", "serial"),
        default="all",
        help="parallel: every test but those marked serial (what .ci/run runs under xdist); "
        "serial: only those, run after the parallel part on two workers (a core each)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "serial: a bound on timing (a result URL's lifetime, a share of a key's slots) that "
        "parallel workers competing for the CPU would decide instead of the code; .ci/run "
        "runs these after the parallel part, two at a time on two cores",
    )
    config.addinivalue_line(
        "markers",
        "slow(seconds=N): a long test, started before the others, longest (N s on an idle "
        "machine) first",
    )


#: What a test marked ``slow`` without ``seconds=`` is taken to last (most last 15-35 s).
SLOW_SECONDS = 20.0


def _start_order(item: pytest.Item) -> tuple[int, float]:
    """The long tests (marked slow) first, longest first (``slow(seconds=N)``: the wall
    time a test or module takes on an idle machine). xdist hands tests out one at a time
    as workers free up (``pytest_xdist_make_scheduler``), so the longest start at once,
    side by side, and the short ones fill in around them; a long one drawn at the end
    would keep the others waiting for it. Last, the tests that only collect what a
    background scenario started at collection did (tests/pipeline/minute_storm.py): early,
    they would hold a worker waiting for it. Every worker sorts alike, so xdist sees one
    order; the sort is stable, so within each kind the files' order stays."""
    if "minute_storm" in getattr(item, "fixturenames", ()):
        return (2, 0.0)
    slow = item.get_closest_marker("slow")
    if slow is None:
        return (1, 0.0)
    return (0, -float(slow.kwargs.get("seconds", SLOW_SECONDS)))


#: Modules whose tests share an expensive module-scoped fixture: each runs on one worker.
#: The scale-out pool (a Prefect server, PostgreSQL, two workers) and the hostile corpus's
#: 37 CLI runs would otherwise be set up again on every worker that draws one of their tests.
ONE_WORKER_MODULES = frozenset(
    {
        "tests/flows/test_scale_out.py",
        "tests/flows/test_server_restart.py",
        "tests/hostile/test_hostile_corpus.py",
    }
)


#: ``pytest_configure_node`` gives workers this file; the first writes every test's
#: (kind, seconds) there (``_start_order``) for the scheduler, which sees node ids only.
_ORDER_FILE = "klein_start_order"
_ORDER_PATH = pytest.StashKey[str]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """(xdist, controller) Where the first worker writes the start order it sorted by."""
    stash = node.config.stash
    if _ORDER_PATH not in stash:
        folder = tempfile.mkdtemp(prefix="klein-start-order-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        stash[_ORDER_PATH] = os.path.join(folder, "order.json")
    node.workerinput[_ORDER_FILE] = stash[_ORDER_PATH]


def _write_start_order(config: pytest.Config, items: list[pytest.Item]) -> None:
    """(xdist, first worker) Each test's (kind, seconds) of ``_start_order`` for the
    controller's scheduler, written whole before the workers report their collections."""
    workerinput = getattr(config, "workerinput", None)
    if not workerinput or workerinput.get("workerid") != "gw0" or _ORDER_FILE not in workerinput:
        return
    order = {item.nodeid: [kind, -key] for item in items for kind, key in [_start_order(item)]}
    path = workerinput[_ORDER_FILE]
    with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
        json.dump(order, handle)
    os.replace(f"{path}.tmp", path)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's default ``load`` mode with four changes: the modules in ``ONE_WORKER_MODULES``
    are one unit of work each, units go out in the collection's order (slow first, longest
    first), one at a time as workers free up, behind a long unit goes a short one from the
    back of the queue, and those using the session's Prefect server go to
    ``PREFECT_WORKERS`` processes while there is other work (``work_order.next_unit``).

    ``--dist worksteal`` gave each worker a contiguous quarter up front, so every slow test
    landed on the first worker one after another (the lost-worker test started after 13
    minutes); ``--dist loadgroup`` with ``xdist_group`` marks would do this, but under
    pytest 9 xdist 3.8's group suffix never reaches the scheduler (``Item.nodeid`` no longer
    reads ``_nodeid``). Another ``--dist`` given on the command line is honoured."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    def module(scope: str) -> str:
        return scope.split("::", 1)[0]

    uses_fixture = re.compile(r"\bprefect_(?:server|api)\b")

    @functools.cache
    def uses_prefect(test_file: str) -> bool:
        """Whether ``test_file`` names the fixture (the controller of an xdist run collects
        nothing: it sees node ids only)."""
        path = config.rootpath / test_file
        return path.is_file() and bool(uses_fixture.search(path.read_text(encoding="utf-8")))

    class LongestFirst(LoadScopeScheduling):
        def __init__(self, config: pytest.Config, log: Any) -> None:
            super().__init__(config, log)
            #: The test processes given a unit that uses the Prefect server.
            self.prefect_nodes: set[Any] = set()
            #: Each test's (kind, seconds) as the workers sorted them; empty until read
            #: (and for good, without the file: every unit then counts as short).
            self.order: dict[str, list[float]] | None = None

        def _split_scope(self, nodeid: str) -> str:
            return module(nodeid) if module(nodeid) in ONE_WORKER_MODULES else nodeid

        def _start_orders(self) -> dict[str, list[float]]:
            if self.order is None:
                try:
                    with open(self.config.stash.get(_ORDER_PATH, ""), encoding="utf-8") as handle:
                        self.order = json.load(handle)
                except (OSError, ValueError):
                    self.order = {}
            return self.order

        def _seconds(self, tests: dict[str, bool]) -> float:
            order = self._start_orders()
            return max((order.get(t, [1, 0.0])[1] for t in tests), default=0.0)

        def _is_filler(self, scope: str) -> bool:
            """A unit of one test that is neither slow nor a background scenario's."""
            tests = self.workqueue[scope]
            return len(tests) == 1 and self._start_orders().get(next(iter(tests)), [0])[0] == 1

        def _assign_work_unit(self, node: Any) -> None:
            """The unit ``work_order.next_unit`` picks, given what ``node`` runs now."""
            nodes = self.prefect_nodes
            pending = (t for t in self.assigned_work[node].values() if not all(t.values()))
            scope = next_unit(
                self.workqueue,
                running_s=self._seconds(next(pending, {})),
                is_filler=self._is_filler,
                uses_prefect=lambda scope: uses_prefect(module(scope)),
                may_start_prefect=node in nodes or len(nodes) < PREFECT_WORKERS,
            )
            if uses_prefect(module(scope)):
                nodes.add(node)
            self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    config.option.loadscopereorder = False
    return LongestFirst(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Any:
    """Collect with the cyclic garbage collector paused, then freeze what is alive.

    Collecting imports every test module and through them Prefect, Polars, pyarrow, moto
    and the pipeline: a few hundred thousand objects that live as long as the test process.
    The collections their allocations trigger walk them all for nothing, and so would every
    full collection the tests' own allocations trigger after: in a ``perf`` profile of the
    parallel part, 10% of the xdist workers' CPU was the collector (benchmarks/notes.md,
    session 28). ``pipeline.cli.collector_paused``, as for a command's imports; whatever a
    test allocates is collected as before."""
    from pipeline.cli import collector_paused

    with collector_paused():
        return (yield)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """``--part serial`` skips the test files that mark no test serial instead of importing
    every module of the suite (polars, Prefect, moto) to deselect a thousand tests: 2 s of
    the serial part's wall time on an idle machine."""
    if config.getoption("--part") != "serial" or not collection_path.name.startswith("test_"):
        return None
    if collection_path.suffix != ".py":
        return None
    return b"mark.serial" not in collection_path.read_bytes() or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_start_order)
    _write_start_order(config, items)
    part = config.getoption("--part")
    if part == "all":
        return
    keep = part == "serial"
    selected: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        wanted = (item.get_closest_marker("serial") is not None) == keep
        (selected if wanted else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def migrated_prefect_database() -> str:
    """A Prefect database with every migration applied, made once per machine and Prefect
    version by whichever test process asks first (the others wait on a lock): each
    server of the suite starts on a copy. Migrating a fresh SQLite database is about half
    of a test server's start (14-15 CPU-seconds fresh, 6-9 on a migrated copy, this
    machine), and the suite starts one per worker."""
    import fcntl
    import sqlite3
    import subprocess
    import sys

    import prefect

    path = os.path.join(tempfile.gettempdir(), f"klein-prefect-{prefect.__version__}.db")
    if os.path.exists(path):
        return path
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            building = f"{path}.{os.getpid()}"
            prefect_cli = os.path.join(os.path.dirname(sys.executable), "prefect")
            subprocess.run(
                [prefect_cli, "--no-prompt", "server", "database", "upgrade", "-y"],
                env=os.environ
                | {"PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{building}"},
                check=True,
                capture_output=True,
                timeout=600,
            )
            # Everything in the one file (no write-ahead log beside it), then in place.
            with contextlib.closing(sqlite3.connect(building)) as db:
                db.execute("PRAGMA journal_mode=DELETE")
            os.replace(building, path)
    return path


@pytest.fixture(scope="session")
def sim_images(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> str:
    """One folder where this test run's simulators, on every xdist worker, keep the images
    they render (``SimConfig.image_dir``): the same catalogs' images were rendered again by
    each simulator process and each worker."""
    base = tmp_path_factory.getbasetemp()
    run = base.parent if worker_id != "master" else base  # pytest-N/popen-gwK under xdist
    return str(run / "sim-images")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One temporary Prefect server (SQLite in a temp dir) per test process: its API URL.

    Flows run inside the test process use it (``prefect_api`` in tests/flows), and so do
    the ``klein-batch flow`` processes a test starts with ``PREFECT_API_URL`` set to it, as
    a deployment's would. A process in Prefect's ephemeral mode starts a server of its own
    and migrates a fresh database: 9-15 CPU-seconds each on this machine, where one talking
    to a running server needs 1.5. This one starts on a copy of a migrated database
    (``migrated_prefect_database``). Ephemeral mode itself keeps its own test
    (tests/flows/test_flow_cli.py). The start may wait minutes for a CPU when the machine
    is busy: a slow start is not a failure.
    """
    import prefect.testing.utilities as harness
    from prefect.settings import PREFECT_API_URL

    template = migrated_prefect_database()

    def folder_with_the_database() -> str:
        # The harness makes its database folder with ``mkdtemp`` and names the file
        # ``prefect-test.db`` (Prefect 3.9.1); a migrated copy there is a server start
        # without its migrations. Were the names to change, the copy would only go unused.
        folder = tempfile.mkdtemp()
        shutil.copyfile(template, os.path.join(folder, "prefect-test.db"))
        return folder

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "mkdtemp", folder_with_the_database)
        with harness.prefect_test_harness(server_startup_timeout=180):
            url = PREFECT_API_URL.value()
            assert url, "prefect_test_harness set no API URL"
            yield str(url)
