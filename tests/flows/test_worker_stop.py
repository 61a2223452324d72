"""``klein-batch worker``'s stop, on real processes shaped like a Prefect worker's: a worker
process whose flow runs are children in process groups of their own, each a supervisor
with an engine below it (``flows/worker.py``). The whole command on a Prefect pool:
``tests/flows/test_lost_parent.py::test_a_stopped_worker_stops_the_night_first_and_it_runs_again``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows import worker as supervisor

#: A flow run: a supervisor in a process group of its own that ignores SIGTERM, as
#: Prefect's does, and an engine below it that takes ``STOP`` seconds to stop on SIGTERM
#: and then writes ``stopped`` (its submits journaled), unless told to ignore SIGTERM.
FLOW_RUN = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, lambda *a: None)
    engine = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
    sys.exit(engine.wait())
    """
)
ENGINE = textwrap.dedent(
    """
    import signal, sys, time
    folder, stop, ignore = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "ignore"
    def stopping(signum, frame):
        if ignore:
            return
        time.sleep(stop)
        open(folder + "/stopped", "w").write("journaled")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stopping)
    open(folder + "/started", "w").write("")
    while True:
        time.sleep(0.05)
    """
)
#: The worker: starts one flow run and waits; it reaps its children only when it runs.
WORKER = textwrap.dedent(
    """
    import subprocess, sys, time
    run = subprocess.Popen(
        [sys.executable, "-c", sys.argv[1], sys.argv[2], *sys.argv[3:]],
        start_new_session=True,
    )
    while True:
        time.sleep(0.05)
        run.poll()
    """
)


@pytest.fixture
def worker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[bytes]]:
    stop_s, mode = request.param
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, FLOW_RUN, ENGINE, str(tmp_path), str(stop_s), mode],
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline, "the engine did not start"
        time.sleep(0.05)
    yield process
    below = supervisor.children(process.pid)
    for pid in [process.pid, *below]:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    process.wait(timeout=10)


def state(pid: int) -> str:
    fields = supervisor._stat(pid)
    return fields[0] if fields else "gone"


@pytest.mark.parametrize("worker", [(1.0, "stop")], indirect=True)
def test_the_flow_runs_stop_first_while_the_worker_is_frozen(
    worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    said: list[str] = []
    (run,) = supervisor.children(worker.pid)
    started = time.monotonic()
    supervisor.drain(worker.pid, [started], said.append)
    took = time.monotonic() - started
    # The engine had its second to stop and journal, below a supervisor that ignores
    # SIGTERM: the signal went to the flow run's process group, as Prefect's does.
    assert (tmp_path / "stopped").read_text() == "journaled"
    assert 1.0 <= took < 10, took
    assert not supervisor.alive(run)
    # The worker is still frozen (it starts nothing more); the flow run, exited, waits
    # for it as a zombie.
    assert state(worker.pid) == "T"
    assert state(run) == "Z"
    assert said[0].startswith("stopping 1 flow run(s)") and said[-1] == "the flow runs stopped"


@pytest.mark.parametrize("worker", [(0.0, "ignore")], indirect=True)
def test_a_second_signal_kills_the_flow_runs(
    worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    said: list[str] = []
    (run,) = supervisor.children(worker.pid)
    first = time.monotonic()
    stops = [first]
    # A systemd unit's SIGTERM reaches this process twice at once (directly and through
    # the worker's group): not a second stop. One 2 s later is.
    stops.append(first + 0.01)
    threading.Timer(2.0, lambda: stops.append(time.monotonic())).start()
    supervisor.drain(worker.pid, stops, said.append)
    took = time.monotonic() - first
    assert 2.0 <= took < 8, took
    time.sleep(0.5)
    assert not supervisor.alive(run)
    assert not (tmp_path / "stopped").exists()
    assert "stopped again: killing the flow runs" in said


@pytest.mark.parametrize("worker", [(0.0, "ignore")], indirect=True)
def test_flow_runs_that_do_not_stop_are_killed_after_the_drain_time(
    worker: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "DRAIN_S", 1.5)
    said: list[str] = []
    (run,) = supervisor.children(worker.pid)
    started = time.monotonic()
    supervisor.drain(worker.pid, [started], said.append)
    assert 1.5 <= time.monotonic() - started < 6
    time.sleep(0.5)
    assert not supervisor.alive(run)
    assert said[-1] == "flow runs still running after 2 s: killing them"


#: ``klein-batch worker`` around a stand-in for the Prefect worker: ``supervise`` with the
#: stand-in's command line, its exit code the process's.
SUPERVISOR = textwrap.dedent(
    """
    import sys
    from flows.worker import supervise
    sys.exit(supervise([], command=[sys.executable, "-c", sys.argv[1], sys.argv[2]]))
    """
)
#: The stand-in: says it started, exits 3 after a while, or 0 at once on ``WORKER_STOP``
#: (the way the real one stops); a SIGTERM of its own is ignored, as the real one's is.
STAND_IN = textwrap.dedent(
    """
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *a: None)
    signal.signal(signal.SIGUSR1, lambda *a: sys.exit(0))
    open(sys.argv[1], "w").write("")
    time.sleep(6.0)
    sys.exit(3)
    """
)


@contextlib.contextmanager
def supervisor_of_a_stand_in(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    started = tmp_path / "started"
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, STAND_IN, str(started)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, "the stand-in did not start"
            time.sleep(0.05)
        time.sleep(0.3)  # the supervisor is in its wait
        yield process
    finally:
        for pid in [*supervisor.children(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)


def wakeups(pid: int) -> int:
    """How many times ``pid`` went to sleep (its voluntary context switches)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def test_the_supervisor_sleeps_until_its_worker_exits(tmp_path: Path) -> None:
    """No polling while the worker runs (``Popen.wait`` with a timeout woke every 50 ms,
    45 times in these 1.5 s, all night on a real worker), and the worker's exit code
    passed on."""
    with supervisor_of_a_stand_in(tmp_path) as process:
        before = wakeups(process.pid)
        time.sleep(1.5)
        woke = wakeups(process.pid) - before
        assert woke <= 5, f"the supervisor woke {woke} times in 1.5 s"
        # Its exit code passed on, once it ends on its own (6 s after it started).
        assert process.wait(timeout=15) == 3


def test_a_stop_signal_wakes_the_supervisor_at_once(tmp_path: Path) -> None:
    """SIGTERM during the wait: the worker is frozen, its (no) flow runs stopped, then it
    is told to stop and does, seconds before it would have ended on its own."""
    with supervisor_of_a_stand_in(tmp_path) as process:
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 3.0
        assert process.stdout is not None
        assert "stopping the worker" in process.stdout.read()
