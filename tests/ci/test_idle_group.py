"""``.ci/idle-group``: the cgroup ``.ci/run`` puts the parallel part in, so that the serial
tests beside it get the CPU first."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

IDLE_GROUP = Path(__file__).resolve().parents[2] / ".ci" / "idle-group"
SPIN = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass"


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spinner() -> subprocess.Popen[bytes]:
    child = subprocess.Popen([sys.executable, "-c", SPIN])
    os.sched_setaffinity(child.pid, {min(os.sched_getaffinity(0))})  # one CPU for both
    return child


def test_a_process_in_the_group_gets_only_the_cpu_others_leave() -> None:
    name = f"klein-idle-test-{os.getpid()}"
    made = subprocess.run(["bash", str(IDLE_GROUP), name], capture_output=True, text=True)
    if made.returncode != 0:
        assert made.stdout == "", made.stdout  # says nothing: .ci/run runs the parts in turn
        pytest.skip("no idle cgroup here (not root, no cgroup CPU controller, or no cpu.idle)")
    group = Path(made.stdout.strip())
    # Beside it, a process of the top group (this test may itself run in .ci/run's group).
    top = group.parent / "cgroup.procs"
    idle, busy = _spinner(), _spinner()
    try:
        assert group.name == name and (group / "cpu.idle").read_text().strip() == "1"
        (group / "cgroup.procs").write_text(str(idle.pid))
        top.write_text(str(busy.pid))
        assert str(idle.pid) in (group / "cgroup.procs").read_text().split()
        assert f":/{name}" in Path(f"/proc/{idle.pid}/cgroup").read_text()
        before = _cpu_s(idle.pid), _cpu_s(busy.pid)
        time.sleep(2)
        idle_s, busy_s = _cpu_s(idle.pid) - before[0], _cpu_s(busy.pid) - before[1]
        # Two spinners on one CPU: the idle one gets what the other leaves, nearly nothing.
        assert busy_s > 0.5 and idle_s < busy_s / 5, (idle_s, busy_s)
    finally:
        # The spinner in the top group goes first, and the other leaves the idle group before
        # its kill: starved there, it took until the first one's 30 s ran out to die (a
        # suite's accounting run: this test took 30 s and 24 CPU-seconds instead of 2).
        busy.kill()
        with contextlib.suppress(OSError):
            top.write_text(str(idle.pid))
        idle.kill()
        for child in (idle, busy):
            child.wait()
        for _ in range(50):  # the group empties once the kernel has reaped the child
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert not group.exists()
