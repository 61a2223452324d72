"""Which unit of work a pytest-xdist worker gets next: the rule of ``tests/conftest.py``'s
scheduler (``pytest_xdist_make_scheduler``), apart so that it can be tested on its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Reversible

#: A unit of work expected to take at least this long (``slow(seconds=N)``; a module run on
#: one worker, its longest mark) gets a short test queued behind it, not the next long one:
#: an xdist worker holds the test after the one it runs (it needs it to start that one), so
#: whatever is queued behind a long test waits for all of it: Ctrl-C on a flow (55 s),
#: queued behind the 300 s Prefect-restart test, started at 395 s and ended the parallel
#: part (issue 16; benchmarks/notes.md, "Session 27"). In the serial part, the 3 s test
#: queued behind the 37 s key-sharing test made the part 3 s longer (session 30).
LONG_UNIT_S = 30.0
#: Test processes that may start the session's Prefect server (``prefect_server``, started by
#: each on first use: about 7 CPU-seconds, then 1.6 a minute idle) while other work is left:
#: six workers started six, 160 CPU-seconds with the pools' servers, on a suite whose wall
#: time is its CPU on two cores.
PREFECT_WORKERS = 3


def next_unit(
    queue: Reversible[str],
    *,
    running_s: float,
    is_filler: Callable[[str], bool],
    uses_prefect: Callable[[str], bool],
    may_start_prefect: bool,
) -> str:
    """The unit to give a worker, from ``queue`` (longest first, never empty).

    The front of the queue, or, while the worker runs a unit of ``running_s`` >=
    ``LONG_UNIT_S`` seconds, the last short one (``is_filler``: neither slow nor waiting on
    a background scenario) if any is left. A worker that may not start the Prefect server
    (``may_start_prefect``) gets the first such choice that does not use it, if any.
    """

    def candidates() -> Iterator[str]:
        if running_s >= LONG_UNIT_S:
            yield from (unit for unit in reversed(queue) if is_filler(unit))
        yield from queue

    first = next(candidates())
    if may_start_prefect:
        return first
    return next((unit for unit in candidates() if not uses_prefect(unit)), first)
