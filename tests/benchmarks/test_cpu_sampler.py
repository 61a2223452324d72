"""The CPU sampler counts where CPU went, and not where the process only waited."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.cpu_sampler import report
from benchmarks.harness import REPO

_PROGRAM = """
import sys, time
import benchmarks.cpu_sampler as sampler
sampler.start(sys.argv[1])

def burn():
    end = time.process_time() + 0.4
    while time.process_time() < end:
        sum(range(1000))

def wait():
    time.sleep(0.8)

burn()
wait()
"""


def test_samples_land_where_the_cpu_went(tmp_path: Path) -> None:
    out = tmp_path / "samples.json"
    subprocess.run([sys.executable, "-c", _PROGRAM, str(out)], check=True, cwd=REPO, timeout=60)
    counts = json.loads(out.read_text())
    innermost = dict(counts["innermost"])
    # 0.4 s of CPU at a tick of at most 10 ms: dozens of samples, nearly all in burn();
    # the 0.8 s asleep in wait() costs no CPU and gets none.
    assert counts["samples"] >= 30
    assert innermost.get("<string>:burn", 0) >= 0.8 * counts["samples"]
    assert "<string>:wait" not in innermost
    assert "samples" in report(out) and "<string>:burn" in report(out)
