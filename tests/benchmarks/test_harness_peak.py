"""The benchmark harness's memory figure: a contender's exact peak, even when it comes and
goes between two of the harness's samples (the last moments of a short run)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from benchmarks.harness import run_process, wait_sampling

_BRIEF_PEAK = (
    "import time; time.sleep(0.2); block = bytearray(200 * 2**20); "
    "block[::4096] = bytes(len(block[::4096])); del block"
)


def test_a_peak_between_two_samples_is_still_measured(tmp_path: Path) -> None:
    command = [sys.executable, "-c", _BRIEF_PEAK]
    _, reaper, outcome = run_process(
        command, env=dict(os.environ), log=tmp_path / "child.log", timeout_s=60, cpus=[]
    )
    # One sample, at the start: everything after it is only known from the process itself.
    wait_sampling(reaper, outcome, every_s=60)
    assert outcome["exit_code"] == 0, (tmp_path / "child.log").read_text()
    memory = outcome["memory"]
    assert memory.at_exit_mb is not None
    assert 200 <= memory.peak_mb < 400
    assert memory.peak_mb == memory.at_exit_mb
