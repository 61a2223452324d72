"""``benchmarks.suite_cpu`` counts the CPU of the processes a test starts, by kind, with its
system time, and each test's own: a test that burns CPU itself and starts a simulator-like
Python process that burns more, one whose child's CPU is mostly the kernel's, one that only
sleeps; a timeline of the machine's busy cores and the tests running; and the machine's
speed before and after, by a fixed loop."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import REPO

_TESTS = """
import subprocess, sys, time

def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        sum(range(1000))

def test_burns_here_and_in_a_child():
    burn(0.5)
    child = (
        "import time\\nend = time.process_time() + 0.6\\n"
        "while time.process_time() < end: sum(range(10000))"
    )
    subprocess.run([sys.executable, "-c", "# pipeline.sim\\n" + child], check=True)

def test_asks_the_kernel():
    # A system call per turn: most of this child's CPU is the kernel's (system time).
    child = (
        "import os, time\\nnull = os.open(os.devnull, os.O_WRONLY)\\n"
        "end = time.process_time() + 0.6\\n"
        "while time.process_time() < end: os.stat('/'); os.write(null, b'x')"
    )
    subprocess.run([sys.executable, "-c", "# prefect.engine\\n" + child], check=True)

def test_waits():
    time.sleep(0.5)
"""


def test_it_counts_children_by_kind_and_each_tests_own(tmp_path: Path) -> None:
    tests = tmp_path / "test_burning.py"
    tests.write_text(_TESTS)
    folder = tmp_path / "acct"
    pytest_args = ["-q", "-p", "no:cacheprovider", str(tests)]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite_cpu", str(folder), "--", *pytest_args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    child = next(line for line in lines if line.startswith("klein-batch sim / simulator"))
    cpu, _system, _share, processes, _each = child.split()[-5:]
    assert 0.5 <= float(cpu) <= 1.5 and processes == "1", child
    kernel = next(line for line in lines if line.startswith("Prefect flow run: engine"))
    cpu, _system, _share, processes, _each = kernel.split()[-5:]
    assert 0.5 <= float(cpu) <= 1.5 and processes == "1", kernel
    own = {line.split()[-1]: float(line.split()[0]) for line in lines if "::test_" in line}
    by_test = {name.rsplit("::", 1)[1]: seconds for name, seconds in own.items()}
    assert 0.4 <= by_test["test_burns_here_and_in_a_child"] < 1.0, own  # not its child's 0.6
    assert by_test["test_waits"] < 0.2, own
    yardstick = next(line for line in lines if line.startswith("yardstick"))
    speeds = re.findall(r"(\d+\.\d+) (?:CPU s before|after)", yardstick)
    assert len(speeds) == 2 and all(float(s) > 0.0 for s in speeds), yardstick
    timeline = lines[lines.index(next(line for line in lines if line.startswith("timeline"))) + 1]
    start_s, _unit, used, running = timeline.split()[:4]
    assert start_s == "0" and 0.0 < float(used) <= 2.0 and running == "3", timeline
    listed = json.loads((folder / "processes.json").read_text())
    assert any("pipeline.sim" in p["command"] and p["cpu"] >= 0.5 for p in listed), listed
    kernel_s = {
        kind: p["sys"]
        for p in listed
        for kind in ("pipeline.sim", "prefect.engine")
        if kind in p["command"]
    }
    assert kernel_s["pipeline.sim"] < 0.2 <= kernel_s["prefect.engine"], kernel_s
