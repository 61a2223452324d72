"""When to ask the API's task list which of our tasks have ended (dialect A).

Polling one task tells one task's state; the probes of ``limits.SlotController`` learn
that *some* slot is free at the price of a refused submit now and then. Dialect A also
answers ``GET`` on the submit address with every task of the key and its status, one
request for all of them. Asked about once per task that ends, it tells which slots are free
within a fraction of a task's time, with no refused submit and no poll until the task is
known to be done (one poll then fetches the image's address). On the ``standard`` tier that
kept the key 0.97-0.98 busy where probes alone reach 0.95, with a fifth of their 429s
(``benchmarks/notes.md``).

The list holds every task the key ran in the API's retention window (the simulator's:
about twenty minutes), ours and other clients', finished or not. Read once per ending,
that costs this process and the API in proportion to the tasks retained, so the list is
asked only while its size lets it keep up with the endings: ``LIST_ENTRIES_PER_S`` entries
a second at most, and no further apart than ``KEEP_UP`` times the interval the endings call
for. Past that (a key whose tasks end faster than ``1 / MIN_INTERVAL_S`` can be asked, such
as the ``scale`` tier, or a long run whose list has grown to thousands of entries) the run
polls and probes exactly as without it, and looks at the list's size again every
``RECHECK_S``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Lists asked per task expected to end: one list every 1.25 endings. At the ``standard``
#: tier one per ending kept the key 0.977 busy at 2.04 requests per image (lists and polls
#: together), one per 1.25 endings 0.973 at 1.85, one per 1.5 endings 0.968 at 1.72
#: (benchmarks/notes.md).
PER_ENDING = 1.25
#: The closest two lists may follow each other.
MIN_INTERVAL_S = 0.02
#: The most entries read a second (about 1.3 MB of JSON; a few per cent of a core).
LIST_ENTRIES_PER_S = 20_000
#: The list is used while the interval its size allows is at most this many times the one
#: the endings call for.
KEEP_UP = 2.0
#: How long the list counts as up to date after its last answer; past that (errors, no
#: answer) every task is polled as usual.
LIVE_S = 2.0
#: How long one list request may take.
TIMEOUT_S = 2.0
#: How often a list found too long is measured again, and how often the plan is made
#: again while the list is not used.
RECHECK_S = 30.0
REPLAN_S = 0.2
#: The longest wait between two lists while the list is used (failures back off to it).
MAX_WAIT_S = 5.0
#: The length taken for a list too large to read (over the engine's answer size limit).
OVERSIZED = 1 << 30
#: Consecutive failed lists double the interval, this many times at most.
MAX_BACKOFF_STEPS = 5


@dataclass(frozen=True, slots=True)
class Plan:
    """The next list. ``useful``: it keeps up with the endings; then it is asked after
    ``wait_s``. Otherwise the engine polls as usual; ``too_long`` says the list's size is
    what stops it (asked again after ``RECHECK_S`` to measure it), else the endings are too
    fast for any list (planned again after ``REPLAN_S``, nothing asked)."""

    useful: bool
    wait_s: float = 0.0
    too_long: bool = False


def plan(
    endings_per_s: float, entries: int, *, tail_s: float | None = None, failures: int = 0
) -> Plan:
    """When to ask the list next, from how fast tasks end and how long the list last was.

    ``endings_per_s``: the pace tasks end at (accepted submits a second on a full key, or
    the tasks in flight over the median time); ``entries``: the last list's length;
    ``tail_s``: once every row is submitted, the longest wait between two lists (the run
    waits for its last tasks to be *noticed*: the engine's drain spacing, which the list
    replaces); ``failures``: lists failed in a row since the last answer.
    """
    wanted = PER_ENDING / endings_per_s if endings_per_s > 0.0 else REPLAN_S
    if tail_s is not None:
        wanted = min(wanted, tail_s)
    if KEEP_UP * wanted < MIN_INTERVAL_S:
        return Plan(useful=False)
    affordable = max(MIN_INTERVAL_S, entries / LIST_ENTRIES_PER_S)
    if affordable > KEEP_UP * wanted:
        return Plan(useful=False, too_long=True)
    backoff = 2.0 ** min(failures, MAX_BACKOFF_STEPS)
    return Plan(useful=True, wait_s=min(max(wanted, affordable) * backoff, MAX_WAIT_S))
