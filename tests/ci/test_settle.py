"""``.ci/settle``: what ``.ci/run`` does between its parallel and serial parts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SETTLE = Path(__file__).resolve().parents[2] / ".ci" / "settle"


def _settle(mark: str, wait_s: int, *then: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KLEIN_CI_PART"}
    env["KLEIN_SETTLE_WAIT_S"] = str(wait_s)
    return subprocess.run(
        ["bash", str(SETTLE), mark, *then], capture_output=True, text=True, env=env, timeout=60
    )


def test_a_process_of_the_parallel_part_left_running_is_named_and_stopped() -> None:
    mark = f"settle-test-{os.getpid()}-{time.monotonic_ns()}"
    # Python ignoring SIGTERM, as a server stuck in its shutdown would: KILL must follow.
    stuck = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\n"
            "time.sleep(300)",
        ],
        env={**os.environ, "KLEIN_CI_PART": mark},
        stdout=subprocess.PIPE,
        text=True,
    )
    other = subprocess.Popen(["sleep", "300"])  # not marked: not the settle's business
    try:
        assert stuck.stdout is not None and stuck.stdout.readline() == "up\n"
        done = _settle(mark, 1, "as the serial part starts")
        assert done.returncode == 0, done.stderr
        assert "1 process(es) of the parallel part still running" in done.stderr
        # Named (its pid, with its command line cut to a line) before it is stopped.
        named = done.stderr.partition("still running after 1 s, stopping:\n")[2]
        assert named.split()[:1] == [str(stuck.pid)], done.stderr
        assert stuck.wait(timeout=10) == -9
        assert other.poll() is None
        assert "% busy as the serial part starts" in done.stderr
    finally:
        for proc in (stuck, other):
            proc.kill()
            proc.wait()


def test_nothing_left_running_is_a_quiet_pass() -> None:
    done = _settle(f"settle-none-{os.getpid()}", wait_s=60)
    assert done.returncode == 0, done.stderr
    assert "still running" not in done.stderr
    # Without NEXT (the serial part ran beside the parallel one), no CPU share to measure.
    assert "sync took" in done.stderr and "% busy" not in done.stderr
