"""Where a process spends its CPU, by sampling its stack on the CPU clock.

cProfile times every call, and that doubles the cost of the small Python functions a run is
made of (a profiled 800-row run took 6.2 s of CPU against 1.8 s unprofiled), so its shares
overstate the engine against C code (the event loop's ``select``, SQLite, libjpeg). This
asks the kernel for a signal after each tick of the process's own CPU time
(``ITIMER_PROF``: user and system time, never time spent waiting) and counts, per sample,
the innermost frame and the innermost frame of klein-batch's own code, so "the loop and
aiohttp" (no pipeline frame below the run), "imports" and each pipeline function get the
share of the CPU they really take. The kernel's tick is coarse (4 ms on this machine), so a
run gives a few hundred samples: shares of 5% and up are worth reading, single samples are
not.

Used by ``benchmarks.client_cpu --sample FILE``; the counts are written to ``FILE`` as JSON
when the process exits, and ``python -m benchmarks.cpu_sampler FILE`` prints them.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType

#: Frames of these folders are klein-batch's own code.
OWN = (f"{os.sep}pipeline{os.sep}", f"{os.sep}flows{os.sep}")


def _name(frame: FrameType) -> str:
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"


def start(path: str, interval_s: float = 0.001) -> None:
    """Sample this process until it exits, then write the counts to ``path``."""
    innermost: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0

    def sample(signum: int, frame: FrameType | None) -> None:
        nonlocal total
        if frame is None:
            return
        total += 1
        innermost[_name(frame)] += 1
        current: FrameType | None = frame
        while current is not None and not any(p in current.f_code.co_filename for p in OWN):
            current = current.f_back
        own["(no frame of ours)" if current is None else _name(current)] += 1

    def write() -> None:
        signal.setitimer(signal.ITIMER_PROF, 0.0, 0.0)
        counts = {"samples": total, "own": own.most_common(), "innermost": innermost.most_common()}
        Path(path).write_text(json.dumps(counts, indent=1))

    signal.signal(signal.SIGPROF, sample)
    signal.setitimer(signal.ITIMER_PROF, interval_s, interval_s)
    atexit.register(write)


def report(path: Path, top: int = 30) -> str:
    """The counts of ``path`` as two tables: by our innermost function, by innermost frame."""
    counts = json.loads(path.read_text())
    total = max(1, counts["samples"])
    lines = [f"{counts['samples']} samples"]
    for title, key in (("innermost frame of ours", "own"), ("innermost frame", "innermost")):
        lines.append(f"-- {title}")
        lines += [f"{n:6d} {100 * n / total:5.1f}%  {name}" for name, n in counts[key][:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1])))
