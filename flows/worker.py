"""``klein-batch worker``: a Prefect process worker that stops its flow runs before itself.

``prefect worker start`` (Prefect 3.9.1) SIGKILLs its flow runs' processes within 10 ms of
its own SIGTERM or SIGINT (anyio closes each child with a kill before Prefect's own
terminate-with-grace), so ``systemctl stop`` or Ctrl-C on a worker mid-night cut the
shards running there off with their submits in the air: tasks the API charged and no
journal knows, paid again when their rows run again (measured: 4-8 rows per stop, README
"Stopping a worker mid-night"). This command runs the same worker as a child, with Prefect's
stop-on-signal handlers replaced by a log line, and stops it in this order:

1. the worker is frozen (SIGSTOP), so it starts no flow run while the others stop;
2. each of its flow runs gets SIGTERM, as Prefect's own cancellation sends it (to the flow
   run's process group): the catalog flows then stop their shards, journal the answers to
   their submits in the air and end (``flows/sigterm.py``);
3. once they are gone (or after ``DRAIN_S``), the worker resumes and stops the way
   Prefect's first SIGINT stops it.

A second signal while they stop kills the flow runs at once, as a second Ctrl-C on
Prefect's worker does. The worker runs in a session of its own, so a terminal's Ctrl-C
reaches this process only; under systemd's default ``KillMode=control-group`` the worker and
its flow runs get the SIGTERM too: the worker ignores it, the flow runs start stopping.
Linux only (``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

#: How long the flow runs get to stop: more than ``flows.sigterm.STOP_S`` (25 s) and the
#: seconds a Python process takes to exit, within systemd's default stop timeout (90 s).
DRAIN_S = 45.0
#: How long the worker gets to stop once its flow runs are gone.
WORKER_STOP_S = 30.0
#: Signals that stop this command (systemd, a terminal, ``kill``).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: What tells the worker itself to stop: the usual signals are ignored there, so that a
#: signal sent to every process of a systemd unit does not stop it before its flow runs.
WORKER_STOP = signal.SIGUSR1
#: Where a process's children and state are read (Linux).
PROC = Path("/proc")


def supervise(
    args: Sequence[str],
    say: Callable[[str], None] = print,
    command: Sequence[str] | None = None,
) -> int:
    """Run ``prefect worker start ARGS`` under this process; return its exit code.

    ``command``: the worker's command line instead (tests)."""
    if not PROC.is_dir():
        say(
            "warning: no /proc here: when stopped, this worker cannot stop its flow runs "
            "first, and they end as `prefect worker start` ends them (killed)"
        )
    started = command or [sys.executable, "-m", "flows.worker", *args]
    worker = subprocess.Popen(started, start_new_session=True)
    stops: list[float] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stops.append(time.monotonic())

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    _wait(worker, stops)
    if worker.returncode is not None:
        return worker.returncode
    drain(worker.pid, stops, say)
    say("stopping the worker")
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker.pid, signal.SIGCONT)
        os.kill(worker.pid, WORKER_STOP)
    try:
        worker.wait(timeout=WORKER_STOP_S)
    except subprocess.TimeoutExpired:
        say(f"the worker did not stop within {WORKER_STOP_S:.0f} s: killing it")
        worker.kill()
        worker.wait()
    return 0


def _wait(worker: subprocess.Popen[bytes], stops: list[float]) -> None:
    """Sleep until ``worker`` exits or a stop signal arrives (``stops`` grows).

    ``Popen.wait`` with a timeout polls in steps of up to 50 ms: thirty wake-ups a second all
    night, 0.2 CPU-seconds a minute (an idle pool: more than the Prefect worker it waits
    for). Here one ``select`` sleeps until the worker's pidfd says it exited or Python's
    own signal handler writes the signal's number to the wake-up pipe, which it does
    whenever the signal comes, so none slips in between the check and the sleep. Polling
    remains where pidfds are missing (Linux before 5.3, other systems)."""
    try:
        pidfd: int | None = os.pidfd_open(worker.pid)
    except (AttributeError, OSError):
        pidfd = None
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous: int | None = None  # the wake-up fd before ours, once ours is set
    if pidfd is not None:
        with contextlib.suppress(ValueError):  # not the main thread: no wake-up pipe
            previous = signal.set_wakeup_fd(write)
    try:
        while worker.poll() is None and not stops:
            if previous is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.wait(timeout=0.5)
                continue
            select.select([pidfd, read], [], [])
            with contextlib.suppress(BlockingIOError):
                os.read(read, 512)
    finally:
        if previous is not None:
            signal.set_wakeup_fd(previous)
        for fd in (pidfd, read, write):
            if fd is not None:
                os.close(fd)


def drain(worker: int, stops: list[float], say: Callable[[str], None]) -> None:
    """Freeze ``worker``, SIGTERM its flow runs, wait until they are gone.

    ``stops`` holds the times of the signals received; one more, a second after the first
    (systemd sends one to each process of a unit at once), kills the flow runs at once.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker, signal.SIGSTOP)
    runs = [pid for pid in children(worker) if alive(pid)]
    if not runs:
        return
    say(
        f"stopping {len(runs)} flow run(s) of this worker first (each catalog flow journals "
        f"its submits in the air, so nothing is paid twice), then the worker; again to kill "
        f"them at once"
    )
    for pid in runs:
        _signal_run(pid, signal.SIGTERM)
    first = stops[0]
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline:
        left = [pid for pid in runs if alive(pid)]
        if not left:
            say("the flow runs stopped")
            return
        if any(at - first > 1.0 for at in stops[1:]):
            say("stopped again: killing the flow runs")
            break
        time.sleep(0.2)
    else:
        say(f"flow runs still running after {DRAIN_S:.0f} s: killing them")
    for pid in runs:
        _signal_run(pid, signal.SIGKILL)


def _signal_run(pid: int, sig: signal.Signals) -> None:
    """Signal a flow run's process: its process group when it leads one (Prefect starts a
    flow run's supervisor in a group of its own, its engine inside), else the process."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name: state, ppid, pgrp, ..."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found: list[int] = []
    if not PROC.is_dir():
        return found
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid``, or anything in the process group it leads, still runs.

    A flow run's processes are children of a frozen worker: once they exit they stay
    zombies until the worker resumes and reaps them, and a zombie has done all it will do.
    """
    fields = _stat(pid)
    if fields is not None and fields[0] != "Z":
        return True
    if fields is None or int(fields[2]) != pid:
        return False
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            member = _stat(int(entry.name))
            if member is not None and int(member[2]) == pid and member[0] != "Z":
                return True
    return False


def serve(args: Sequence[str]) -> None:
    """Be the worker: ``prefect worker start ARGS`` with its signal handling replaced.

    Only ``WORKER_STOP`` stops it, the way Prefect's first SIGINT does; SIGTERM and SIGINT
    are logged and left to the supervisor. Handlers, not ``SIG_IGN``: an ignored signal
    stays ignored in the flow runs' processes the worker starts. If the supervisor dies
    (SIGKILL), the worker stops too rather than run on unsupervised.
    """
    import prefect.utilities.processutils as processutils

    def handlers(pid: int, process_name: str, print_fn: Callable[..., Any]) -> None:
        def ignored(signum: int, frame: FrameType | None) -> None:
            print_fn(
                f"{signal.Signals(signum).name} ignored: klein-batch worker stops the flow "
                f"runs first, then this worker"
            )

        signal.signal(signal.SIGTERM, ignored)
        signal.signal(signal.SIGINT, ignored)
        signal.signal(WORKER_STOP, signal.default_int_handler)

    processutils.setup_signal_handlers_worker = handlers
    supervisor = os.getppid()

    def watch_supervisor() -> None:
        while os.getppid() == supervisor:
            time.sleep(2)
        os.kill(os.getpid(), WORKER_STOP)

    threading.Thread(target=watch_supervisor, daemon=True, name="supervisor-watch").start()
    from prefect.cli import app

    sys.argv = ["prefect", "worker", "start", *args]
    sys.exit(app())


if __name__ == "__main__":
    serve(sys.argv[1:])
