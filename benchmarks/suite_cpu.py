"""Where the test suite's CPU goes, by kind of process (issue 16: the suite is CPU-bound on
two cores, so its wall time falls only with its CPU)::

    python -m benchmarks.suite_cpu /tmp/acct -- -n 4 --part parallel

runs pytest with the arguments after ``--`` and prints the CPU-seconds of every process it
started (and how many of them the kernel spent for it: system time), grouped (pytest's own
workers, ``klein-batch`` runs, Prefect servers, workers, flow runs, PostgreSQL, the
simulator, ...), with how many processes of each kind. Python
processes report their own CPU as they exit (a ``sitecustomize`` on ``PYTHONPATH``);
every process it started (its environment says so) is also sampled from ``/proc`` every
0.2 s, which counts the ones killed (SIGKILL) and those that are not Python, to within
their last 0.2 s. Then a timeline: the machine's busy cores every 30 s, and the tests that
ran where they idled. With the total, the machine's speed (``yardstick``): two runs compare by it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")

SITECUSTOMIZE = """
import atexit, json, os, sys, time

def _klein_cpu_record():
    times = os.times()
    path = os.path.join(os.environ["KLEIN_CPU_DIR"], "%d.json" % os.getpid())
    with open(path, "w") as handle:
        json.dump(
            {"argv": list(sys.orig_argv), "cpu": times.user + times.system, "sys": times.system},
            handle,
        )

if os.environ.get("KLEIN_CPU_DIR"):
    atexit.register(_klein_cpu_record)
"""

#: A pytest plugin (``-p klein_cpu_tests``): each test's CPU in the process running it
#: (set-up, call and tear-down, every thread of that process; not the processes it starts),
#: and when it started and ended.
PLUGIN = """
import json, os, time
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start, began = time.process_time(), time.time()
    yield
    path = os.path.join(os.environ["KLEIN_CPU_DIR"], "tests-%d.jsonl" % os.getpid())
    with open(path, "a") as handle:
        spent = time.process_time() - start
        handle.write(json.dumps([item.nodeid, spent, began, time.time()]) + "\\n")
"""

#: (kind, pattern of the command line), first match wins.
KINDS = [
    ("pytest (controller and xdist workers)", r"-m pytest|exec\(eval\(sys\.stdin"),
    ("Prefect flow run: engine", r"prefect\.engine|prefect\.flow_engine|_workspace_runtime"),
    ("Prefect flow run: supervisor", r"_workspace_supervisor"),
    ("Prefect server", r"prefect server start|uvicorn|prefect\.server"),
    ("Prefect worker", r"prefect worker start|flows\.worker|klein-batch worker"),
    ("prefect CLI (deploy, work-pool, ...)", r"bin/prefect "),
    ("klein-batch flow / python -m flows", r"klein-batch flow|-m flows"),
    ("klein-batch sim / simulator", r"klein-batch sim|pipeline\.sim|SimConfig"),
    ("klein-batch run / other commands", r"klein-batch"),
    ("PostgreSQL", r"postgres"),
    ("S3 server (moto)", r"moto"),
    ("browser (chromium)", r"chrom"),
    ("benchmarks / helpers", r"benchmarks\."),
    ("other python", r"python"),
]


def kind_of(command: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, command):
            return kind
    return "other"


#: The timeline's bucket, and the machine's busy cores under which a bucket is listed with
#: the tests that ran in it (a suite that leaves cores idle waits on something).
BUCKET_S = 30.0
IDLE_BELOW = 0.8


def machine_busy() -> float:
    """CPU-seconds the whole machine has been busy (not idle, not waiting on I/O)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def sample(
    seen: dict[int, tuple[str, float, float]],
    busy: list[tuple[float, float]],
    stop: threading.Event,
    mark: bytes,
) -> None:
    """The command line, CPU and system CPU so far of every process whose environment holds
    ``mark`` (what the measured pytest started, reparented ones too; not what else runs meanwhile,
    such as another test run's simulators), and the machine's busy CPU-seconds, every
    0.2 s, until ``stop``."""
    me = os.getpid()
    foreign: set[int] = set()
    while not stop.is_set():
        busy.append((time.time(), machine_busy()))
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in foreign or int(entry.name) == me:
                continue
            try:
                if int(entry.name) not in seen and mark not in (entry / "environ").read_bytes():
                    foreign.add(int(entry.name))
                    continue
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                user, system = int(fields[11]) / TICK, int(fields[12]) / TICK
                command = seen.get(int(entry.name), ("", 0.0, 0.0))[0] or (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except (OSError, IndexError, ValueError):
                continue
            seen[int(entry.name)] = (command, user + system, system)
        stop.wait(0.2)


#: Turns of ``yardstick``'s loop: about a second of CPU on this machine.
YARDSTICK_TURNS = 5_000_000


def yardstick(turns: int = YARDSTICK_TURNS) -> float:
    """CPU-seconds for a fixed pure-Python loop: how fast this machine is just now.

    The same tests' CPU moved by a fifth between runs of one afternoon, and this loop by as
    much (20 million turns: 3.1 to 5.0 s within two hours, nothing else running), so two
    runs of the suite compare by their CPU in yardsticks, measured before and after each.
    """
    start = time.process_time()
    total = 0
    for turn in range(turns):
        total += turn * turn % 7
    return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    split = args.index("--") if "--" in args else len(args)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("folder", type=Path, help="a new folder for the records")
    options = parser.parse_args(args[:split])
    records = options.folder / "records"
    records.mkdir(parents=True, exist_ok=True)
    (options.folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (options.folder / "klein_cpu_tests.py").write_text(PLUGIN)
    env = os.environ | {
        "KLEIN_CPU_DIR": str(records),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(options.folder), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    already = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    seen: dict[int, tuple[str, float, float]] = {}
    busy: list[tuple[float, float]] = []
    stop = threading.Event()
    mark = f"KLEIN_CPU_DIR={records}".encode()
    sampler = threading.Thread(target=sample, args=(seen, busy, stop, mark), daemon=True)
    sampler.start()
    before = yardstick()
    started = time.monotonic()
    pytest_args = ["-p", "klein_cpu_tests", *args[split + 1 :]]
    code = subprocess.call([sys.executable, "-m", "pytest", *pytest_args], cwd=REPO, env=env)
    wall = time.monotonic() - started
    after = yardstick()
    stop.set()
    sampler.join()
    #: pid -> (command, CPU-seconds, of them in the kernel)
    cpu: dict[int, tuple[str, float, float]] = {
        pid: found for pid, found in seen.items() if pid not in already
    }
    for record in records.glob("[0-9]*.json"):
        data = json.loads(record.read_text())
        cpu[int(record.stem)] = (" ".join(data["argv"]), data["cpu"], data["sys"])
    listing = [
        {"pid": pid, "cpu": round(c, 2), "sys": round(k, 2), "command": cmd[:300]}
        for pid, (cmd, c, k) in cpu.items()
    ]
    (options.folder / "processes.json").write_text(json.dumps(listing, indent=0))
    tests = [json.loads(line) for path in records.glob("tests-*.jsonl") for line in path.open()]
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for command, seconds, system in cpu.values():
        total = totals[kind_of(command)]
        total[0] += seconds
        total[1] += system
        total[2] += 1
    everything = sum(t[0] for t in totals.values())
    kernel = sum(t[1] for t in totals.values())
    print(
        f"\npytest exit {code}; wall {wall:.0f} s; CPU {everything:.0f} s "
        f"({kernel:.0f} of them system), {len(cpu)} processes"
    )
    print(
        f"yardstick ({YARDSTICK_TURNS:,} turns of a Python loop): {before:.2f} CPU s before, "
        f"{after:.2f} after; CPU {2 * everything / (before + after):,.0f} yardsticks"
    )
    print(f"{'kind':<42} {'CPU s':>8} {'system':>7} {'share':>6} {'procs':>6} {'s each':>7}")
    for kind, (seconds, system, count) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(
            f"{kind:<42} {seconds:>8.0f} {system:>7.0f} {seconds / everything:>6.1%} "
            f"{count:>6.0f} {seconds / count:>7.1f}"
        )
    in_tests = sum(test[1] for test in tests)
    print(f"\n{in_tests:.0f} CPU s in the tests' own processes; the 25 largest:")
    for nodeid, seconds, *_ in sorted(tests, key=lambda t: -t[1])[:25]:
        print(f"{seconds:8.1f}  {nodeid}")
    print_timeline(busy, tests)
    return code


def print_timeline(busy: list[tuple[float, float]], tests: list[list[Any]]) -> None:
    """The machine's busy cores and the tests running, bucket by bucket; the tests of a
    bucket where the cores were mostly idle are named (what the suite waited on)."""
    if len(busy) < 2:
        return
    cores = os.cpu_count() or 1
    start, end = busy[0][0], busy[-1][0]
    print(f"\ntimeline ({BUCKET_S:.0f} s buckets, {cores} cores): busy cores, tests running")
    at = start
    while at < end:
        inside = [b for b in busy if at <= b[0] <= at + BUCKET_S]
        if len(inside) >= 2:
            used = (inside[-1][1] - inside[0][1]) / max(inside[-1][0] - inside[0][0], 1e-9)
            running = [t[0] for t in tests if t[2] < at + BUCKET_S and t[3] > at]
            line = f"{at - start:6.0f} s {used:5.2f} {len(running):4d}"
            if used < IDLE_BELOW * cores:
                line += "  " + ", ".join(sorted(n.split("::")[-1][:60] for n in running)[:6])
            print(line)
        at += BUCKET_S


if __name__ == "__main__":
    sys.exit(main())
