"""The measuring side of the benchmarks: simulator process, contender process, figures.

Every figure that compares contenders comes from outside the contender: the simulator's
``/_sim/stats`` counters (occupancy, polls, 429s, accepted submits) and the kernel's account
of the contender process (``wait4``: CPU time of it and the children it reaped; ``/proc``:
its peak resident memory, children included). A contender can therefore not flatter
itself, and the same figures are taken the same way for a 30-line script and for
klein-batch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: Put first on a contender's ``PYTHONPATH``: its ``sitecustomize`` reports the exact peak.
PEAK_HOOK = Path(__file__).resolve().parent / "peak_hook"

#: Stats are sampled this often once the first submit has been seen, and every
#: ``FAST_SAMPLE_S`` before, so that time to first submit is known to a few milliseconds.
SAMPLE_S = 0.1
FAST_SAMPLE_S = 0.01
#: How often ``measure(prune_images=True)`` deletes the images that landed.
PRUNE_EVERY_S = 2.0


@dataclass(slots=True)
class SimSettings:
    """One simulated API: the tier of the benchmark key, its latency model and its faults."""

    tier: str
    max_active: int
    submits_per_minute: int
    median_s: float
    p95_s: float
    error_503: float = 0.0
    drop: float = 0.0
    fault_seed: int = 1
    #: Svix-style signing secret of the key's webhooks (the webhook contender sets one).
    webhook_secret: str | None = None
    #: The simulator's ``[latency] preset`` (``median_s``/``p95_s`` above must be its figures).
    latency_preset: str | None = None
    cap_s: float | None = None

    def toml(self, key: str) -> str:
        lines = [
            'retry_after = "seconds"',
            "",
            "[[keys]]",
            'name = "bench"',
            f'key = "{key}"',
            f'tier = "{self.tier}"',
            f"max_active = {self.max_active}",
            f"submits_per_minute = {self.submits_per_minute}",
            *([f'webhook_secret = "{self.webhook_secret}"'] if self.webhook_secret else []),
            "",
            "[latency]",
            *([f'preset = "{self.latency_preset}"'] if self.latency_preset else []),
            f"median_s = {self.median_s}",
            f"p95_s = {self.p95_s}",
            *([f"cap_s = {self.cap_s}"] if self.cap_s is not None else []),
            "queued_fraction = 0.1",
            "",
            "[faults]",
            f"seed = {self.fault_seed}",
        ]
        for endpoint in ("submit", "poll", "list", "download"):
            lines += [
                "",
                f"[faults.{endpoint}]",
                f"error_503 = {self.error_503}",
                f"drop = {self.drop}",
            ]
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        text = (
            f"tier {self.tier} ({self.max_active} active, {self.submits_per_minute} submits/min), "
            f"task latency lognormal median {self.median_s:g} s, p95 {self.p95_s:g} s"
        )
        if self.cap_s is not None:
            text += f", capped at {self.cap_s:g} s"
        if self.latency_preset:
            text += f' (`preset = "{self.latency_preset}"`)'

        if self.error_503 or self.drop:
            text += (
                f"; on submit, poll, task list and download: {self.error_503:.0%} 503s, "
                f"{self.drop:.0%} dropped connections"
            )
        return text


@dataclass(slots=True)
class Sample:
    t: float
    occupancy_s: float
    active: int
    accepted: int
    refused: int


@dataclass(slots=True)
class Figures:
    """What one contender achieved on one scenario (see RESULTS.md for definitions)."""

    contender: str
    rows: int
    images: int
    exit_code: int | None
    timed_out: bool
    wall_s: float
    utilization: float
    steady_utilization: float | None
    steady_window_s: float | None
    images_per_s: float
    polls_per_image: float | None
    cpu_s: float
    cpu_s_per_1000: float | None
    peak_rss_mb: float
    first_submit_s: float | None
    rate_limited: int
    submits_accepted: int
    submits_refused: int
    extra_paid_tasks: int
    faults: dict[str, int] = field(default_factory=dict)
    #: Seconds from the key's last task ending to the poll that saw it (the simulator's
    #: ``last_finish_poll_lag_s``): the run's end, as ``first_submit_s`` is its start.
    last_noticed_s: float | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Simulator:
    """``python -m pipeline.sim`` in its own process (pinned to CPU 0 when possible)."""

    def __init__(self, settings: SimSettings, workdir: Path, key: str, cpus: list[int]) -> None:
        self.settings = settings
        self.key = key
        config = workdir / "sim.toml"
        config.write_text(settings.toml(key))
        command = [sys.executable, "-m", "pipeline.sim", "--config", str(config), "--port", "0"]
        if cpus and shutil.which("taskset"):
            command = ["taskset", "-c", ",".join(map(str, cpus)), *command]
        self._log = (workdir / "sim.log").open("wb")
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        assert self.process.stdout is not None
        stdout = self.process.stdout
        line = _readline_within(stdout, 30.0)
        found = re.search(rb"(http://127\.0\.0\.1:\d+)", line)
        if not found:
            self.stop()
            said = line.decode(errors="replace").strip()
            logged = (workdir / "sim.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError("the simulator did not start: " + " / ".join([said, *logged]))
        self.url = found.group(1).decode()
        # Keep reading its stdout: a full pipe would stall the server mid-run.
        threading.Thread(target=_drain, args=(stdout,), daemon=True).start()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_sim/stats", timeout=10) as response:
            return json.loads(response.read())["keys"]["bench"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _readline_within(stream: Any, timeout_s: float) -> bytes:
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return result[0] if result else b""


def _drain(stream: Any) -> None:
    while stream.read(65536):
        pass


class TreeMemory:
    """Peak resident memory of a process and its descendants, sampled from ``/proc``.

    ``wait4``'s ``ru_maxrss`` cannot be used: the child inherits the high-water mark of the
    harness's address space at fork/exec, so every small client would be charged the
    harness's memory. ``VmHWM`` of the process itself starts fresh at exec and is exact;
    descendants (Prefect's temporary server) add their resident size at each sample. A
    Python process also writes its ``VmHWM`` as it exits (``peak_hook``): the last
    fraction of a second, between two samples, is not lost.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mb = 0.0
        #: The process's own peak as it wrote it at exit; None if it could not.
        self.at_exit_mb: float | None = None

    def exited(self, written: Path) -> None:
        try:
            self.at_exit_mb = int(written.read_text()) / 1024
        except (OSError, ValueError):
            return
        self.peak_mb = max(self.peak_mb, self.at_exit_mb)

    def sample(self) -> None:
        own = status_kb(self.pid, "VmHWM")
        if own is None:
            return
        children = sum(status_kb(child, "VmRSS") or 0 for child in _descendants(self.pid))
        self.peak_mb = max(self.peak_mb, (own + children) / 1024)


def status_kb(pid: int, field_name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task_dir in tasks:
            try:
                children = [int(c) for c in (task_dir / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += children
            stack += children
    return found


def run_process(
    command: list[str],
    *,
    env: dict[str, str],
    log: Path,
    timeout_s: float,
    cpus: list[int],
    cwd: Path = REPO,
) -> tuple[subprocess.Popen[bytes], threading.Thread, dict[str, Any]]:
    """Start ``command``; a thread reaps it with ``wait4`` (its CPU time, children included).

    The caller samples ``outcome["memory"]`` while the reaper thread is alive.
    """
    if cpus and shutil.which("taskset"):
        command = ["taskset", "-c", ",".join(map(str, cpus)), *command]
    # A Python contender writes its own exact peak at exit (peak_hook/sitecustomize.py).
    peaks = Path(tempfile.mkdtemp(prefix="bench-peaks-"))
    paths = [str(PEAK_HOOK), *filter(None, [env.get("PYTHONPATH")])]
    env = {**env, "KLEIN_BENCH_PEAK_DIR": str(peaks), "PYTHONPATH": os.pathsep.join(paths)}
    handle = log.open("wb")
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )
    outcome: dict[str, Any] = {"started": started, "timed_out": False}

    def reap() -> None:
        _, status, usage = os.wait4(process.pid, 0)
        outcome["ended"] = time.monotonic()
        outcome["exit_code"] = os.waitstatus_to_exitcode(status)
        outcome["cpu_s"] = usage.ru_utime + usage.ru_stime
        process.returncode = outcome["exit_code"]
        handle.close()
        memory.exited(peaks / str(process.pid))
        shutil.rmtree(peaks, ignore_errors=True)

    memory = TreeMemory(process.pid)
    outcome["memory"] = memory
    reaper = threading.Thread(target=reap, daemon=True)
    reaper.start()

    def stop_after_timeout() -> None:
        reaper.join(timeout_s)
        if reaper.is_alive():
            outcome["timed_out"] = True
            # The whole process group: Prefect's temporary server included.
            for signum in (signal.SIGINT, signal.SIGKILL):
                try:
                    os.killpg(process.pid, signum)
                except ProcessLookupError:
                    return
                reaper.join(10)
                if not reaper.is_alive():
                    return

    threading.Thread(target=stop_after_timeout, daemon=True).start()
    return process, reaper, outcome


def wait_sampling(reaper: threading.Thread, outcome: dict[str, Any], every_s: float) -> None:
    """Wait for a process to end, sampling its memory meanwhile."""
    while reaper.is_alive():
        outcome["memory"].sample()
        reaper.join(every_s)


def measure(
    contender: str,
    command: list[str],
    *,
    sim: Simulator,
    rows: int,
    out: Path,
    env: dict[str, str],
    log: Path,
    timeout_s: float,
    cpus: list[int],
    prune_images: bool = False,
) -> Figures:
    """Run one contender to its end against a fresh simulator and take its figures.

    ``prune_images`` deletes each image once it has landed (counted first): the memory
    sweep's million-row run writes about 60 GB of images, more than a disk may hold, and
    the client never reads an image back after writing it.
    """
    limit = sim.settings.max_active
    samples: list[Sample] = []
    first_submit: float | None = None
    _, reaper, outcome = run_process(command, env=env, log=log, timeout_s=timeout_s, cpus=cpus)
    started = outcome["started"]
    pruned = [0]
    pruner: threading.Thread | None = None
    if prune_images:
        pruner = threading.Thread(target=_prune, args=(out / "images", reaper, pruned), daemon=True)
        pruner.start()
    while reaper.is_alive():
        outcome["memory"].sample()
        stats = sim.stats()
        now = time.monotonic()
        submits = stats["submits_accepted"] + stats["submits_refused"]
        if first_submit is None and submits:
            first_submit = now - started
        samples.append(
            Sample(
                now,
                stats["occupancy_s"],
                stats["active"],
                stats["submits_accepted"],
                stats["submits_refused"],
            )
        )
        reaper.join(SAMPLE_S if first_submit is not None else FAST_SAMPLE_S)
    ended = outcome.get("ended", time.monotonic())
    stats = sim.stats()
    wall = ended - started
    if pruner is not None:
        pruner.join()
    images = pruned[0] + _landed(out / "images")
    steady, window = steady_utilization(samples, limit)
    # A task list answers for every task at once: it counts as a poll (pipeline/task_list.py).
    polls = stats["polls"] + stats.get("list_calls", 0)
    cpu = outcome.get("cpu_s", float("nan"))
    return Figures(
        contender=contender,
        rows=rows,
        images=images,
        exit_code=outcome.get("exit_code"),
        timed_out=outcome["timed_out"],
        wall_s=round(wall, 3),
        utilization=round(stats["occupancy_s"] / (limit * wall), 4),
        steady_utilization=None if steady is None else round(steady, 4),
        steady_window_s=None if window is None else round(window, 2),
        images_per_s=round(images / wall, 3),
        polls_per_image=round(polls / images, 3) if images else None,
        cpu_s=round(cpu, 3),
        cpu_s_per_1000=round(cpu * 1000 / images, 2) if images else None,
        peak_rss_mb=round(outcome["memory"].peak_mb, 1),
        first_submit_s=None if first_submit is None else round(first_submit, 3),
        rate_limited=stats["rate_limited"],
        submits_accepted=stats["submits_accepted"],
        submits_refused=stats["submits_refused"],
        extra_paid_tasks=max(0, stats["submits_accepted"] - images),
        faults=stats["faults"],
        last_noticed_s=round(stats["last_finish_poll_lag_s"], 3),
    )


def _landed_paths(folder: Path) -> list[str]:
    """Images in ``folder``; temporary files (dot names) the client still writes left out."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        return [entry.path for entry in entries if not entry.name.startswith(".")]


def _landed(folder: Path) -> int:
    return len(_landed_paths(folder))


def _prune(folder: Path, reaper: threading.Thread, pruned: list[int]) -> None:
    """Delete landed images every few seconds until the run ends, counting them."""
    while reaper.is_alive():
        reaper.join(PRUNE_EVERY_S)
        for path in _landed_paths(folder):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            pruned[0] += 1


def steady_utilization(samples: list[Sample], limit: int) -> tuple[float | None, float | None]:
    """Utilization between the first moment the tier was full and the last accepted submit.

    Before the tier first fills, a client is ramping up; after its last submit, the slots
    drain as the last tasks finish, which no client can avoid. A client that never fills
    the tier is measured from its first accepted submit (its whole run is its steady state).
    """
    if not samples:
        return None, None
    final = samples[-1].accepted
    start = next((s for s in samples if s.active >= limit), None)
    if start is None:
        start = next((s for s in samples if s.accepted > 0), None)
    end = next((s for s in samples if s.accepted >= final), None)
    if start is None or end is None or end.t - start.t < 1.0:
        return None, None
    window = end.t - start.t
    return (end.occupancy_s - start.occupancy_s) / (limit * window), window
