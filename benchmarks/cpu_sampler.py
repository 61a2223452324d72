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

Only the main thread is sampled (a signal handler runs there): CPU of other threads
(naive-async writes its images in one) is counted where the main thread was, mostly
waiting in ``select``. Each sample's whole stack is counted too, so a sample is also put
in one ``KINDS`` bucket (what the run was doing: imports, the task list, the journal,
image files ...), the same buckets for klein-batch and a hand-written client, whose code
has none of klein-batch's functions: its samples fall in the buckets it has (imports,
image files) and the rest.

Used by ``benchmarks.client_cpu --sample FILE``; the counts are written to ``FILE`` as JSON
when the process exits, and ``python -m benchmarks.cpu_sampler FILE [FILE ...]`` prints
them (several files: their kinds side by side).
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
#: What a sample was spent on: the first kind with a frame (``file.py:function``, any
#: depth) starting with one of its prefixes. Imports first (an import inside a function is
#: an import), thumbnails before verification (the 1/8-scale decode verifies a row and
#: makes its thumbnail), the slot controller before submits (a submit waits in it). The
#: naive client (``benchmarks/contenders``) writes its images in ``common.py:store``.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("imports", ("<frozen importlib._bootstrap>:_find_and_load",)),
    (
        "thumbnails",
        ("verify.py:small_jpeg", "ImageFile.py:load", "engine.py:_store_thumbnail"),
    ),
    ("verification", ("verify.py:",)),
    ("journal", ("ledger.py:", "remote_journal.py:")),
    ("image files", ("storage.py:", "common.py:store")),
    ("task list", ("engine.py:_watch_list",)),
    ("slot controller", ("limits.py:",)),
    ("submits", ("engine.py:_submit", "engine.py:_send", "engine.py:_post_submit")),
    ("polls", ("engine.py:_poll", "engine.py:_schedule_polls")),
    ("downloads", ("engine.py:_download",)),
    ("manifest in", ("manifest.py:", "product_exports.py:")),
    (
        "outputs at the end",
        ("output_manifest.py:", "html_report.py:", "report.py:", "summary.py:"),
    ),
)
#: The bucket of everything else: the event loop, aiohttp, the CLI, the engine's glue.
REST = "the rest (event loop, HTTP, glue)"


def _name(frame: FrameType) -> str:
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"


def start(path: str, interval_s: float = 0.001) -> None:
    """Sample this process until it exits, then write the counts to ``path``."""
    innermost: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    stacks: collections.Counter[str] = collections.Counter()

    def sample(signum: int, frame: FrameType | None) -> None:
        # One walk of the stack, innermost frame first, gives all three counts.
        names: list[str] = []
        ours: str | None = None
        current: FrameType | None = frame
        while current is not None:
            if current.f_code.co_filename == __file__:
                # The sampler's own code: a tick that fell due as the program ended runs
                # this handler in ``write``, one that fell due in this handler runs it
                # again inside it. Neither is the program's CPU (nor a stack of it).
                return
            name = _name(current)
            names.append(name)
            if ours is None and any(p in current.f_code.co_filename for p in OWN):
                ours = name
            current = current.f_back
        if not names:
            return
        innermost[names[0]] += 1
        own["(no frame of ours)" if ours is None else ours] += 1
        stacks[";".join(reversed(names))] += 1

    def write() -> None:
        signal.setitimer(signal.ITIMER_PROF, 0.0, 0.0)
        counts = {
            "samples": sum(innermost.values()),
            "own": own.most_common(),
            "innermost": innermost.most_common(),
            "stacks": stacks.most_common(),
        }
        Path(path).write_text(json.dumps(counts, indent=1))

    signal.signal(signal.SIGPROF, sample)
    signal.setitimer(signal.ITIMER_PROF, interval_s, interval_s)
    atexit.register(write)


def kind_of(stack: str) -> str:
    """The ``KINDS`` bucket of one sampled stack (frames joined by ``;``, outermost first)."""
    frames = stack.split(";")
    for kind, prefixes in KINDS:
        if any(frame.startswith(prefixes) for frame in frames):
            return kind
    return REST


def kinds(path: Path) -> dict[str, int]:
    """Samples per kind in the counts of ``path``."""
    counted: collections.Counter[str] = collections.Counter()
    for stack, n in json.loads(path.read_text()).get("stacks", []):
        counted[kind_of(stack)] += n
    return dict(counted)


def side_by_side(paths: list[Path]) -> str:
    """The kinds of several sampled runs as one table: samples and share of each run."""
    tables = [kinds(path) for path in paths]
    names = [kind for kind, _ in KINDS] + [REST]
    lines = ["| kind | " + " | ".join(path.stem for path in paths) + " |"]
    lines.append("|---|" + "---:|" * len(paths))
    totals = [max(1, sum(table.values())) for table in tables]
    for name in names:
        if any(table.get(name) for table in tables):
            cells = [
                f"{table.get(name, 0)} ({100 * table.get(name, 0) / total:.0f}%)"
                for table, total in zip(tables, totals, strict=True)
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| samples | " + " | ".join(str(sum(t.values())) for t in tables) + " |")
    return "\n".join(lines)


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
    files = [Path(arg) for arg in sys.argv[1:]]
    if len(files) == 1:
        print(report(files[0]))
    print(side_by_side(files))
